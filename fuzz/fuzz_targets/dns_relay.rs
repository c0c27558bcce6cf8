//! The forwarder's reply path: `relay_reply()` on arbitrary upstream replies, for
//! forwards built by `answer()` from real queries. It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshd_dataplane::dns::{relay_reply, Forward};

fuzz_target!(|data: &[u8]| {
    // Header: flags (strip the OPT record or not), the client's limit; then the reply.
    let Some((&[flags, limit_hi, limit_lo], reply)) = data.split_first_chunk::<3>() else { return };
    let forward = Forward {
        query: Vec::new(),
        client_id: 0xbeef,
        // 0 and tiny limits included: truncation must cope with any of them.
        client_limit: usize::from(u16::from_be_bytes([limit_hi, limit_lo])),
        strip_opt: flags & 1 == 1,
        servfail: Vec::new(),
        refused: Vec::new(),
    };
    if let Some(out) = relay_reply(&forward, reply) {
        // What reaches the client carries its id and respects its limit (when the
        // limit can hold a header at all).
        assert!(out.len() >= 2 && out[..2] == [0xbe, 0xef], "relayed reply lost the client's id");
        if forward.client_limit >= 512 {
            assert!(
                out.len() <= forward.client_limit,
                "relayed {} bytes over a limit of {}",
                out.len(),
                forward.client_limit
            );
        }
    }
});
