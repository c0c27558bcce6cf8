//! The resolver's request path: `answer()` on arbitrary bytes, against a small table,
//! over both transports and a few configurations. It must never panic.
#![no_main]

use std::{collections::BTreeMap, net::Ipv4Addr, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use meshd_dataplane::dns::{
    answer, AnswerConfig, EndpointMode, NameIndex, NameTable, NetworkNames, Transport,
};
use rand::{rngs::SmallRng, SeedableRng};

/// Two networks like the unit tests': a VIP service, dnsrr services (one with many
/// tasks, so answers get truncated) and tasks.
fn index() -> &'static NameIndex {
    static INDEX: OnceLock<NameIndex> = OnceLock::new();
    INDEX.get_or_init(|| {
        let ip = |a, b, c, d| Ipv4Addr::new(a, b, c, d);
        let front = NetworkNames::default()
            .with_service(
                "web",
                EndpointMode::Vip,
                Some(ip(10, 0, 1, 2)),
                vec![ip(10, 0, 1, 10), ip(10, 0, 1, 11)],
            )
            .with_service("api", EndpointMode::Dnsrr, None, vec![ip(10, 0, 1, 20), ip(10, 0, 1, 21)])
            .with_service("big", EndpointMode::Dnsrr, None, (0..100u8).map(|i| ip(10, 0, 3, i)).collect())
            .with_task("web.1", ip(10, 0, 1, 10))
            .with_task("web.2", ip(10, 0, 1, 11));
        let back = NetworkNames::default()
            .with_service("db", EndpointMode::Vip, Some(ip(10, 0, 2, 2)), vec![ip(10, 0, 2, 10)])
            .with_task("db.1", ip(10, 0, 2, 10));
        NameIndex::build(&NameTable {
            networks: BTreeMap::from([("front".into(), front), ("back".into(), back)]),
        })
    })
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the transport, the asker's networks and the configuration;
    // the rest is the request exactly as a container would send it.
    let Some((&knobs, request)) = data.split_first() else { return };
    let transport = if knobs & 1 == 0 { Transport::Udp } else { Transport::Tcp };
    let asker: Vec<String> = match (knobs >> 1) & 3 {
        0 => vec!["front".into()],
        1 => vec!["back".into()],
        2 => vec!["front".into(), "back".into()],
        _ => Vec::new(),
    };
    let config = AnswerConfig {
        ttl: 5,
        search_suffixes: if knobs & 8 == 0 {
            Vec::new()
        } else {
            vec!["example".into(), "cluster.local".into()]
        },
        max_request: if knobs & 16 == 0 { 4096 } else { 64 },
        max_hops: (knobs >> 5) & 3,
    };
    let mut rng = SmallRng::seed_from_u64(u64::from(knobs));
    let _ = answer(index(), &asker, request, transport, &config, &mut rng);
});
