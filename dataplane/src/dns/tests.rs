//! Unit tests of the answer path: every name form, every bad input, truncation, the
//! loop guard, and a bounded fuzz run over random and mutated packets.

use std::{collections::BTreeMap, net::Ipv4Addr, str::FromStr};

use hickory_proto::{
    op::{Edns, Message, MessageType, OpCode, Query, ResponseCode},
    rr::{
        rdata::opt::{EdnsCode, EdnsOption},
        DNSClass, Name, RData, RecordType,
    },
};
use rand::{rngs::SmallRng, Rng, SeedableRng};

use super::*;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Two networks: `front` (web vip, api dnsrr with three tasks, big dnsrr with 100) and
/// `back` (db vip).
fn table() -> NameTable {
    let front = NetworkNames::default()
        .with_service("web", EndpointMode::Vip, Some(ip("10.0.1.2")), vec![ip("10.0.1.10"), ip("10.0.1.11")])
        .with_service(
            "api",
            EndpointMode::Dnsrr,
            None,
            vec![ip("10.0.1.20"), ip("10.0.1.21"), ip("10.0.1.22")],
        )
        .with_service(
            "big",
            EndpointMode::Dnsrr,
            None,
            (0..100u8).map(|i| Ipv4Addr::new(10, 0, 3, i)).collect(),
        )
        .with_task("web.1", ip("10.0.1.10"))
        .with_task("web.2", ip("10.0.1.11"));
    let back = NetworkNames::default()
        .with_service("db", EndpointMode::Vip, Some(ip("10.0.2.2")), vec![ip("10.0.2.10")])
        .with_task("db.1", ip("10.0.2.10"));
    NameTable { networks: BTreeMap::from([("front".into(), front), ("back".into(), back)]) }
}

fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = 0x1234;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn ask_with(bytes: &[u8], transport: Transport, config: &AnswerConfig) -> Action {
    let index = NameIndex::build(&table());
    let mut rng = SmallRng::seed_from_u64(7);
    answer(&index, &["front".to_owned()], bytes, transport, config, &mut rng)
}

fn reply(bytes: &[u8]) -> Message {
    match ask_with(bytes, Transport::Udp, &AnswerConfig::default()) {
        Action::Reply(r) => Message::from_vec(&r).expect("reply parses"),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn ips(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .map(|r| match &r.data {
            RData::A(a) => a.0,
            other => panic!("not A: {other:?}"),
        })
        .collect()
}

fn ok(name: &str, qtype: RecordType) -> Message {
    let m = reply(&query(name, qtype));
    assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name} {qtype}");
    assert_eq!(m.metadata.id, 0x1234);
    assert_eq!(m.metadata.message_type, MessageType::Response);
    m
}

#[test]
fn vip_service_resolves_to_its_vip_in_every_form() {
    for name in ["web", "web.", "WEB.", "web.front", "Web.Front.", "web.front.example"] {
        let config = AnswerConfig { search_suffixes: vec!["example".into()], ..AnswerConfig::default() };
        let Action::Reply(r) = ask_with(&query(name, RecordType::A), Transport::Udp, &config) else {
            panic!()
        };
        let m = Message::from_vec(&r).unwrap();
        assert_eq!(ips(&m), vec![ip("10.0.1.2")], "{name}");
        assert_eq!(m.answers[0].ttl, 5);
        assert!(m.metadata.authoritative);
    }
}

#[test]
fn dnsrr_service_resolves_to_every_task_shuffled() {
    let mut orders = std::collections::HashSet::new();
    let index = NameIndex::build(&table());
    let mut rng = SmallRng::seed_from_u64(1);
    for _ in 0..50 {
        let Action::Reply(r) = answer(
            &index,
            &["front".into()],
            &query("api", RecordType::A),
            Transport::Udp,
            &AnswerConfig::default(),
            &mut rng,
        ) else {
            panic!()
        };
        let mut got = ips(&Message::from_vec(&r).unwrap());
        orders.insert(got.clone());
        got.sort();
        assert_eq!(got, vec![ip("10.0.1.20"), ip("10.0.1.21"), ip("10.0.1.22")]);
    }
    assert!(orders.len() > 1, "dnsrr answers are shuffled");
}

#[test]
fn tasks_name_gives_every_task_and_task_names_their_ip() {
    assert_eq!(ips(&ok("tasks.web", RecordType::A)), vec![ip("10.0.1.10"), ip("10.0.1.11")]);
    assert_eq!(ips(&ok("tasks.web.front.", RecordType::A)), vec![ip("10.0.1.10"), ip("10.0.1.11")]);
    assert_eq!(ips(&ok("web.1", RecordType::A)), vec![ip("10.0.1.10")]);
    assert_eq!(ips(&ok("WEB.2.front", RecordType::A)), vec![ip("10.0.1.11")]);
}

#[test]
fn aaaa_and_other_types_of_known_names_are_empty_noerror() {
    for qtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
        let m = ok("web", qtype);
        assert!(m.answers.is_empty(), "{qtype}");
    }
}

#[test]
fn ptr_answers_task_ips_and_vips_on_the_askers_networks() {
    let m = ok("10.1.0.10.in-addr.arpa.", RecordType::PTR);
    let RData::PTR(target) = &m.answers[0].data else { panic!() };
    assert_eq!(target.0.to_ascii(), "web.1.front.");
    let m = ok("2.1.0.10.in-addr.arpa.", RecordType::PTR);
    let RData::PTR(target) = &m.answers[0].data else { panic!() };
    assert_eq!(target.0.to_ascii(), "web.front.");
    // An address on a network the asker is not on is not ours to name: forwarded.
    assert!(matches!(
        ask_with(&query("2.2.0.10.in-addr.arpa.", RecordType::PTR), Transport::Udp, &AnswerConfig::default()),
        Action::Forward(_)
    ));
}

#[test]
fn names_of_other_networks_are_nxdomain() {
    for name in ["db", "db.back", "tasks.db", "db.1", "web.back", "nothing.front"] {
        let m = reply(&query(name, RecordType::A));
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty());
    }
}

#[test]
fn unknown_names_are_forwarded_with_the_hop_marker() {
    let Action::Forward(f) =
        ask_with(&query("example.test.", RecordType::A), Transport::Udp, &AnswerConfig::default())
    else {
        panic!()
    };
    assert_eq!(f.client_id, 0x1234);
    assert_eq!(f.client_limit, 512);
    assert!(f.strip_opt);
    let sent = Message::from_vec(&f.query).unwrap();
    let edns = sent.edns.expect("marker added");
    assert_eq!(edns.option(EdnsCode::from(HOP_OPTION)), Some(&EdnsOption::Unknown(HOP_OPTION, vec![1])));
    assert_eq!(edns.max_payload(), 512);
    // The SERVFAIL and REFUSED prepared for the client keep its id and question.
    for (bytes, code) in [(&f.servfail, ResponseCode::ServFail), (&f.refused, ResponseCode::Refused)] {
        let m = Message::from_vec(bytes).unwrap();
        assert_eq!((m.metadata.id, m.metadata.response_code, m.queries.len()), (0x1234, code, 1));
    }
    // The query coming back (an upstream looping to us) is refused, not forwarded again.
    let looped = reply(&f.query);
    assert_eq!(looped.metadata.response_code, ResponseCode::Refused);
}

#[test]
fn upstream_reply_is_relayed_with_the_clients_id_and_no_added_opt() {
    let Action::Forward(f) =
        ask_with(&query("example.test.", RecordType::A), Transport::Udp, &AnswerConfig::default())
    else {
        panic!()
    };
    let mut upstream = Message::from_vec(&f.query).unwrap();
    upstream.metadata.id = 999;
    upstream.metadata.message_type = MessageType::Response;
    let a = hickory_proto::rr::Record::from_rdata(
        Name::from_str("example.test.").unwrap(),
        60,
        RData::A(hickory_proto::rr::rdata::A(ip("192.0.2.1"))),
    );
    upstream.add_answer(a);
    let relayed = Message::from_vec(&relay_reply(&f, &upstream.to_vec().unwrap()).unwrap()).unwrap();
    assert_eq!(relayed.metadata.id, 0x1234);
    assert!(relayed.edns.is_none());
    assert_eq!(ips(&relayed), vec![ip("192.0.2.1")]);
    // A query (not a response) from the "upstream" is not relayed.
    assert!(relay_reply(&f, &f.query).is_none());
}

#[test]
fn large_udp_answers_are_truncated_and_tcp_gets_them_all() {
    let m = reply(&query("big", RecordType::A));
    assert!(m.metadata.truncation);
    let in_512 = m.answers.len();
    assert!(in_512 < 100);
    assert!(m.to_vec().unwrap().len() <= 512);
    let Action::Reply(r) = ask_with(&query("big", RecordType::A), Transport::Tcp, &AnswerConfig::default())
    else {
        panic!()
    };
    let m = Message::from_vec(&r).unwrap();
    assert!(!m.metadata.truncation);
    assert_eq!(m.answers.len(), 100);
    // With EDNS 4096 the client gets up to our 1232-byte limit (100 records need 1600),
    // with an OPT back.
    let mut q = Message::from_vec(&query("big", RecordType::A)).unwrap();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    q.set_edns(edns);
    let Action::Reply(r) = ask_with(&q.to_vec().unwrap(), Transport::Udp, &AnswerConfig::default()) else {
        panic!()
    };
    assert!(r.len() <= usize::from(UDP_PAYLOAD_MAX));
    let m = Message::from_vec(&r).unwrap();
    assert!(m.metadata.truncation);
    assert!(m.answers.len() > in_512);
    assert!(m.edns.is_some());
}

fn rcode_of(bytes: &[u8]) -> ResponseCode {
    match ask_with(bytes, Transport::Udp, &AnswerConfig::default()) {
        Action::Reply(r) => Message::from_vec(&r).unwrap().metadata.response_code,
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn bad_input_gets_the_right_rcode_or_is_dropped() {
    let good = query("web", RecordType::A);
    // Shorter than a header, or a response: dropped.
    for short in [&good[..0], &good[..5], &good[..11]] {
        assert_eq!(ask_with(short, Transport::Udp, &AnswerConfig::default()), Action::Drop);
    }
    let mut response = good.clone();
    response[2] |= 0x80;
    assert_eq!(ask_with(&response, Transport::Udp, &AnswerConfig::default()), Action::Drop);
    // Truncated question: FORMERR.
    assert_eq!(rcode_of(&good[..good.len() - 3]), ResponseCode::FormErr);
    assert_eq!(rcode_of(&good[..12]), ResponseCode::FormErr);
    // Zero and many questions: FORMERR.
    let mut zero = good.clone();
    zero[4..6].copy_from_slice(&0u16.to_be_bytes());
    assert_eq!(rcode_of(&zero), ResponseCode::FormErr);
    let mut m = Message::from_vec(&good).unwrap();
    m.add_query(Query::query(Name::from_str("db").unwrap(), RecordType::A));
    assert_eq!(rcode_of(&m.to_vec().unwrap()), ResponseCode::FormErr);
    // Oversized: FORMERR.
    let mut big = good.clone();
    big.resize(5000, 0);
    assert_eq!(rcode_of(&big), ResponseCode::FormErr);
    // Wrong class: NOTIMP.
    let mut m = Message::from_vec(&good).unwrap();
    m.queries[0].set_query_class(DNSClass::CH);
    assert_eq!(rcode_of(&m.to_vec().unwrap()), ResponseCode::NotImp);
    // Another opcode (NOTIFY, UPDATE): NOTIMP.
    let mut notify = good.clone();
    notify[2] = (notify[2] & 0x87) | (u8::from(OpCode::Notify) << 3);
    assert_eq!(rcode_of(&notify), ResponseCode::NotImp);
    // Zone transfer: NOTIMP.
    assert_eq!(rcode_of(&query("web", RecordType::AXFR)), ResponseCode::NotImp);
    // Garbage after the question claimed as an additional record: FORMERR.
    let mut trailing = good.clone();
    trailing[10..12].copy_from_slice(&1u16.to_be_bytes());
    trailing.extend_from_slice(&[0xc0, 0xff, 0, 1]);
    assert_eq!(rcode_of(&trailing), ResponseCode::FormErr);
    // A compression pointer loop in the name: FORMERR.
    let mut looping = good[..12].to_vec();
    looping.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
    assert_eq!(rcode_of(&looping), ResponseCode::FormErr);
}

#[test]
fn fuzz_random_and_mutated_packets_never_panic() {
    let index = NameIndex::build(&table());
    let config = AnswerConfig { search_suffixes: vec!["example".into()], ..AnswerConfig::default() };
    let mut rng = SmallRng::seed_from_u64(0x5eed);
    let seeds: Vec<Vec<u8>> = vec![
        query("web", RecordType::A),
        query("tasks.api.front.", RecordType::AAAA),
        query("10.1.0.10.in-addr.arpa.", RecordType::PTR),
        query("big", RecordType::A),
        query("example.test", RecordType::MX),
    ];
    let started = std::time::Instant::now();
    for i in 0..200_000u32 {
        let mut packet = if i % 4 == 0 {
            let len = rng.gen_range(0..600);
            (0..len).map(|_| rng.gen()).collect()
        } else {
            seeds[i as usize % seeds.len()].clone()
        };
        for _ in 0..rng.gen_range(1..6) {
            if packet.is_empty() {
                break;
            }
            match rng.gen_range(0..4) {
                0 => {
                    let at = rng.gen_range(0..packet.len());
                    packet[at] = rng.gen();
                }
                1 => packet.truncate(rng.gen_range(0..packet.len())),
                2 => packet.push(rng.gen()),
                _ => {
                    let at = rng.gen_range(0..packet.len());
                    packet[at] ^= 1 << rng.gen_range(0..8);
                }
            }
        }
        let transport = if i % 2 == 0 { Transport::Udp } else { Transport::Tcp };
        if let Action::Reply(r) = answer(&index, &["front".into()], &packet, transport, &config, &mut rng) {
            assert!(r.len() >= 12);
            if transport == Transport::Udp {
                assert!(r.len() <= usize::from(UDP_PAYLOAD_MAX), "UDP reply over the limit for {packet:?}");
            }
        }
        if started.elapsed() > std::time::Duration::from_secs(20) {
            break;
        }
    }
}

#[test]
fn upstreams_exclude_our_own_address() {
    let us = std::net::SocketAddr::from(RESOLVER_ADDR);
    let other = "127.0.0.53:53".parse().unwrap();
    assert_eq!(usable_upstreams(&[us, other, other], us), vec![other]);
}

#[test]
fn config_bounds_are_checked() {
    assert!(ResolverConfig::default().validate().is_ok());
    let bad = ResolverConfig { max_forwards: 0, ..ResolverConfig::default() };
    assert!(bad.validate().unwrap_err().to_string().contains("max forwards"));
}

#[test]
fn a_missing_namespace_is_named_in_the_error() {
    let error =
        open_in_netns(std::path::Path::new("/run/netns/no-such-ns"), RESOLVER_ADDR, None).unwrap_err();
    assert!(error.to_string().contains("no-such-ns"), "{error}");
}

#[test]
fn a_vip_service_without_its_vip_yet_is_ours_not_forwarded() {
    let mut t = table();
    let front = t.networks.remove("front").unwrap().with_service("new", EndpointMode::Vip, None, vec![]);
    t.networks.insert("front".into(), front);
    let index = NameIndex::build(&t);
    let mut rng = SmallRng::seed_from_u64(3);
    let ask = |networks: &[&str], rng: &mut SmallRng| {
        let networks: Vec<String> = networks.iter().map(|n| n.to_string()).collect();
        match answer(
            &index,
            &networks,
            &query("new", RecordType::A),
            Transport::Udp,
            &AnswerConfig::default(),
            rng,
        ) {
            Action::Reply(r) => Message::from_vec(&r).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        }
    };
    // On its network: an empty answer; elsewhere: no such name. Never a forward.
    let m = ask(&["front"], &mut rng);
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert!(m.answers.is_empty());
    assert_eq!(ask(&["back"], &mut rng).metadata.response_code, ResponseCode::NXDomain);
}
