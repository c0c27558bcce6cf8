//! The resolver's decision for one request, without I/O (STYLE.md §3, §13): bytes in,
//! an [`Action`] out. hickory-proto decodes the question and the EDNS record (and every
//! malformed packet is its error, turned into FORMERR); the answers themselves are
//! written here by hand — a copy of the client's question and fixed-size records that
//! point back at it — because that is the hot path and needs no allocation per record.

use std::net::Ipv4Addr;

use hickory_proto::{
    op::{Edns, Message, OpCode, Query},
    rr::{
        rdata::opt::{EdnsCode, EdnsOption},
        DNSClass, RecordType,
    },
    serialize::binary::{BinDecodable, BinDecoder},
};
use rand::RngCore;

use super::table::{NameIndex, Target};

/// DNS header length.
const HEADER: usize = 12;
/// Largest UDP payload we advertise and answer with (the DNS flag day 2020 value:
/// fits every path MTU without fragmentation).
pub const UDP_PAYLOAD_MAX: u16 = 1232;
/// The EDNS option (from the local/experimental range, RFC 6891 §9) that marks a query
/// meshd forwarded, with the hop count as its one byte. An upstream that sends the
/// query back to a meshd resolver brings the marker along, and the hop bound stops it.
pub const HOP_OPTION: u16 = 65_011;

/// Response codes the resolver sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Rcode {
    /// Answered.
    NoError = 0,
    /// The request could not be parsed.
    FormErr = 1,
    /// The upstreams failed or timed out.
    ServFail = 2,
    /// The name does not exist.
    NxDomain = 3,
    /// Opcode or class not supported.
    NotImp = 4,
    /// Refused: the forward bound is hit, or a forwarding loop was detected.
    Refused = 5,
}

/// Whether the request came over UDP (answers limited by 512 or the client's EDNS size)
/// or TCP (up to 65535 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// A datagram.
    Udp,
    /// A length-prefixed message on a stream.
    Tcp,
}

/// Settings of the answer path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AnswerConfig {
    /// TTL of every answer from the table, in seconds (Docker's 600 keeps clients on
    /// dead IPs; 5 follows the cluster closely).
    pub ttl: u32,
    /// Search suffixes stripped from a name before lookup (`svc.mynet.example` with
    /// suffix `example` is looked up as `svc.mynet`); lowercase, no leading/trailing dot.
    pub search_suffixes: Vec<String>,
    /// Largest request accepted; anything longer is answered FORMERR.
    pub max_request: usize,
    /// Forwarding hops after which a query marked by meshd is refused (loop guard).
    pub max_hops: u8,
}

impl Default for AnswerConfig {
    fn default() -> Self {
        AnswerConfig { ttl: 5, search_suffixes: Vec::new(), max_request: 4096, max_hops: 1 }
    }
}

/// What the I/O shell does with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send these bytes back to the client.
    Reply(Vec<u8>),
    /// The name is not in the table: ask the upstreams.
    Forward(Forward),
    /// Send nothing (not a DNS query, or a response: answering could loop or reflect).
    Drop,
}

/// A request to forward, and what the shell needs to answer the client afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Forward {
    /// The query to send upstream: the client's, with meshd's hop marker added.
    pub query: Vec<u8>,
    /// The client's message id (the forwarder may use its own upstream).
    pub client_id: u16,
    /// Largest reply the client accepts.
    pub client_limit: usize,
    /// The client sent no EDNS record, so the OPT record meshd added must not reach it.
    pub strip_opt: bool,
    /// The reply when every upstream fails or times out.
    pub servfail: Vec<u8>,
    /// The reply when the forward bound is hit.
    pub refused: Vec<u8>,
}

/// The request's parts the reply is built from.
struct Request<'a> {
    id: u16,
    /// Byte 2 of the header (opcode and RD kept from it).
    flags_hi: u8,
    /// The question exactly as the client sent it (case preserved, for 0x20 clients).
    question: &'a [u8],
    /// The client's EDNS record, if any.
    edns: Option<Edns>,
}

impl Request<'_> {
    /// Largest reply the client takes over `transport`.
    fn limit(&self, transport: Transport) -> usize {
        match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => match &self.edns {
                Some(e) => usize::from(e.max_payload().clamp(512, UDP_PAYLOAD_MAX)),
                None => 512,
            },
        }
    }
}

/// Decides what to do with `request` from a container on the networks `asker`, using
/// the names in `index`. `rng` shuffles `dnsrr` answers. Never panics, whatever the
/// bytes.
pub fn answer(
    index: &NameIndex,
    asker: &[String],
    request: &[u8],
    transport: Transport,
    config: &AnswerConfig,
    rng: &mut impl RngCore,
) -> Action {
    let Some(header) = request.get(..HEADER) else { return Action::Drop };
    let id = u16::from_be_bytes([header[0], header[1]]);
    let flags_hi = header[2];
    if flags_hi & 0x80 != 0 {
        // A response: never answer one (two resolvers would bounce it forever).
        return Action::Drop;
    }
    let error = |rcode, question: &[u8]| {
        let req = Request { id, flags_hi, question, edns: None };
        Action::Reply(encode(&req, rcode, &[], 0, transport))
    };
    if request.len() > config.max_request {
        return error(Rcode::FormErr, &[]);
    }
    if OpCode::from_u8((flags_hi >> 3) & 0x0f) != OpCode::Query {
        return error(Rcode::NotImp, &[]);
    }
    let count = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let (qdcount, ancount, nscount, arcount) = (count(4), count(6), count(8), count(10));
    if qdcount != 1 {
        return error(Rcode::FormErr, &[]);
    }
    let mut decoder = BinDecoder::new(request);
    if decoder.read_slice(HEADER).is_err() {
        return Action::Drop;
    }
    let Ok(query) = Query::read(&mut decoder) else { return error(Rcode::FormErr, &[]) };
    let question = &request[HEADER..decoder.index()];
    let mut edns = None;
    if ancount != 0 || nscount != 0 || arcount != 0 {
        let others = usize::from(ancount) + usize::from(nscount);
        if Message::read_records(&mut decoder, others, false, OpCode::Query).is_err() {
            return error(Rcode::FormErr, question);
        }
        match Message::read_records(&mut decoder, usize::from(arcount), true, OpCode::Query) {
            Ok((_, e, _)) => edns = e,
            Err(_) => return error(Rcode::FormErr, question),
        }
    }
    let req = Request { id, flags_hi, question, edns };
    let reply = |rcode, records: &[Record], ttl| Action::Reply(encode(&req, rcode, records, ttl, transport));
    if query.query_class() != DNSClass::IN {
        return reply(Rcode::NotImp, &[], 0);
    }
    if matches!(query.query_type(), RecordType::AXFR | RecordType::IXFR) {
        return reply(Rcode::NotImp, &[], 0);
    }
    let name = query.name().to_ascii().to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);

    match lookup(index, asker, name, query.query_type(), config, rng) {
        Lookup::Found(records) => reply(Rcode::NoError, &records, config.ttl),
        Lookup::NoSuchName => reply(Rcode::NxDomain, &[], 0),
        Lookup::Unknown => {
            let hops = req.edns.as_ref().and_then(hop_count).unwrap_or(0);
            if hops >= config.max_hops {
                return reply(Rcode::Refused, &[], 0);
            }
            let Some(query) = mark_forwarded(request, hops + 1, req.limit(transport)) else {
                return reply(Rcode::FormErr, &[], 0);
            };
            Action::Forward(Forward {
                query,
                client_id: id,
                client_limit: req.limit(transport),
                strip_opt: req.edns.is_none(),
                servfail: encode(&req, Rcode::ServFail, &[], 0, transport),
                refused: encode(&req, Rcode::Refused, &[], 0, transport),
            })
        }
    }
}

/// One answer record, pointing back at the question's name.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Record {
    A(Ipv4Addr),
    /// A PTR target, without the trailing dot.
    Ptr(String),
}

enum Lookup {
    /// The name is ours: these records (possibly none, e.g. AAAA) answer it.
    Found(Vec<Record>),
    /// The name is in the cluster's namespace but not visible to the asker.
    NoSuchName,
    /// Not a cluster name: forward it.
    Unknown,
}

fn lookup(
    index: &NameIndex,
    asker: &[String],
    name: &str,
    qtype: RecordType,
    config: &AnswerConfig,
    rng: &mut impl RngCore,
) -> Lookup {
    if let Some(ip) = reverse_name(name) {
        if qtype != RecordType::PTR {
            return Lookup::Unknown;
        }
        let Some(entries) = index.reverse.get(&ip) else { return Lookup::Unknown };
        let records: Vec<Record> = entries
            .iter()
            .filter(|(net, _)| on(index, asker, *net))
            .map(|(_, target)| Record::Ptr(target.clone()))
            .collect();
        return if records.is_empty() { Lookup::Unknown } else { Lookup::Found(records) };
    }
    let mut candidates = vec![name];
    for suffix in &config.search_suffixes {
        if let Some(short) = name.strip_suffix(suffix.as_str()).and_then(|n| n.strip_suffix('.')) {
            candidates.push(short);
        }
    }
    let mut known = false;
    for candidate in candidates {
        let Some(entries) = index.forward.get(candidate) else {
            // `anything.NETWORK` for a cluster network is the cluster's to answer.
            known |=
                candidate.rsplit_once('.').is_some_and(|(_, last)| index.networks.iter().any(|n| n == last));
            continue;
        };
        known = true;
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        let mut visible = false;
        for entry in entries.iter().filter(|e| on(index, asker, e.network)) {
            visible = true;
            match &entry.target {
                Target::One(ip) => ips.push(*ip),
                Target::All(list) => ips.extend(list),
                Target::Shuffled(list) => {
                    let start = ips.len();
                    ips.extend(list);
                    shuffle(&mut ips[start..], rng);
                }
            }
        }
        if !visible {
            continue;
        }
        let mut seen = std::collections::HashSet::with_capacity(ips.len());
        ips.retain(|ip| seen.insert(*ip));
        return Lookup::Found(match qtype {
            RecordType::A | RecordType::ANY => ips.into_iter().map(Record::A).collect(),
            // IPv4-only names: AAAA and every other type get an empty NOERROR, as Docker
            // does, so clients fall back to A without waiting.
            _ => Vec::new(),
        });
    }
    if known {
        Lookup::NoSuchName
    } else {
        Lookup::Unknown
    }
}

fn on(index: &NameIndex, asker: &[String], network: usize) -> bool {
    let name = &index.networks[network];
    asker.iter().any(|a| a.eq_ignore_ascii_case(name))
}

fn shuffle(ips: &mut [Ipv4Addr], rng: &mut impl RngCore) {
    for i in (1..ips.len()).rev() {
        let j = (rng.next_u32() as usize) % (i + 1);
        ips.swap(i, j);
    }
}

/// `d.c.b.a.in-addr.arpa` → a.b.c.d.
fn reverse_name(name: &str) -> Option<Ipv4Addr> {
    let digits = name.strip_suffix(".in-addr.arpa")?;
    let mut octets = [0u8; 4];
    let mut parts = digits.split('.');
    for octet in octets.iter_mut().rev() {
        *octet = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// The hop count in meshd's marker option, if the query carries one.
fn hop_count(edns: &Edns) -> Option<u8> {
    match edns.option(EdnsCode::from(HOP_OPTION))? {
        EdnsOption::Unknown(_, data) => data.first().copied(),
        _ => None,
    }
}

/// The request re-encoded with meshd's hop marker (and an OPT record sized to the
/// client's limit when it sent none, so the upstream's reply fits the client).
fn mark_forwarded(request: &[u8], hops: u8, client_limit: usize) -> Option<Vec<u8>> {
    let mut message = Message::from_vec(request).ok()?;
    let mut edns = message.edns.take().unwrap_or_else(|| {
        let mut e = Edns::new();
        e.set_max_payload(u16::try_from(client_limit).unwrap_or(u16::MAX).clamp(512, UDP_PAYLOAD_MAX));
        e
    });
    edns.options_mut().remove(EdnsCode::from(HOP_OPTION));
    edns.options_mut().insert(EdnsOption::Unknown(HOP_OPTION, vec![hops]));
    message.set_edns(edns);
    message.to_vec().ok()
}

/// The upstream's `reply` as the client gets it: the client's id, no OPT record the
/// client did not ask for, truncated (TC) when larger than the client accepts. `None`
/// when the reply is not a usable response (the shell then tries the next upstream).
pub fn relay_reply(forward: &Forward, reply: &[u8]) -> Option<Vec<u8>> {
    let mut message = Message::from_vec(reply).ok()?;
    if message.metadata.message_type != hickory_proto::op::MessageType::Response {
        return None;
    }
    message.metadata.id = forward.client_id;
    if forward.strip_opt {
        message.edns = None;
    } else if let Some(edns) = message.edns.as_mut() {
        edns.options_mut().remove(EdnsCode::from(HOP_OPTION));
    }
    let bytes = message.to_vec().ok()?;
    if bytes.len() <= forward.client_limit {
        return Some(bytes);
    }
    // Truncation keeps the question section; a reply whose questions alone exceed the
    // client's limit (found by fuzzing: 8 echoed questions) is not usable either.
    message.truncate().to_vec().ok().filter(|b| b.len() <= forward.client_limit).map(|mut b| {
        b[..2].copy_from_slice(&forward.client_id.to_be_bytes());
        b
    })
}

/// Writes a reply: header, the client's question, `records` (as many as fit the
/// client's limit; TC set when some did not), and an OPT record if the client sent one.
fn encode(req: &Request<'_>, rcode: Rcode, records: &[Record], ttl: u32, transport: Transport) -> Vec<u8> {
    let limit = req.limit(transport);
    let opt_len = if req.edns.is_some() { 11 } else { 0 };
    let mut out = Vec::with_capacity(HEADER + req.question.len() + 16 * records.len() + opt_len);
    let qdcount = u16::from(!req.question.is_empty());
    out.extend_from_slice(&req.id.to_be_bytes());
    // QR, the request's opcode and RD; AA for our own names.
    let aa = if rcode == Rcode::NoError || rcode == Rcode::NxDomain { 0x04 } else { 0 };
    out.push(0x80 | (req.flags_hi & 0x79) | aa);
    out.push(0x80 | rcode as u8); // RA
    out.extend_from_slice(&qdcount.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // counts filled in below
    out.extend_from_slice(req.question);
    let mut written: u16 = 0;
    let mut truncated = false;
    for record in records {
        let start = out.len();
        out.extend_from_slice(&[0xc0, 0x0c]); // the question's name, at offset 12
        match record {
            Record::A(ip) => {
                out.extend_from_slice(&1u16.to_be_bytes());
                out.extend_from_slice(&1u16.to_be_bytes());
                out.extend_from_slice(&ttl.to_be_bytes());
                out.extend_from_slice(&4u16.to_be_bytes());
                out.extend_from_slice(&ip.octets());
            }
            Record::Ptr(target) => {
                out.extend_from_slice(&12u16.to_be_bytes());
                out.extend_from_slice(&1u16.to_be_bytes());
                out.extend_from_slice(&ttl.to_be_bytes());
                let len_at = out.len();
                out.extend_from_slice(&[0, 0]);
                encode_name(&mut out, target);
                let len = u16::try_from(out.len() - len_at - 2).unwrap_or(0);
                out[len_at..len_at + 2].copy_from_slice(&len.to_be_bytes());
            }
        }
        if out.len() + opt_len > limit {
            out.truncate(start);
            truncated = true;
            break;
        }
        written += 1;
    }
    if truncated {
        out[2] |= 0x02;
    }
    out[6..8].copy_from_slice(&written.to_be_bytes());
    if req.edns.is_some() {
        // Root name, type OPT, our payload size, extended rcode/version/flags 0, no data.
        out.push(0);
        out.extend_from_slice(&41u16.to_be_bytes());
        out.extend_from_slice(&UDP_PAYLOAD_MAX.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        out[10..12].copy_from_slice(&1u16.to_be_bytes());
    }
    out
}

/// Appends `name` (dot-separated, no trailing dot) in wire form; labels longer than 63
/// bytes are cut (table names come from the store, which limits them anyway).
fn encode_name(out: &mut Vec<u8>, name: &str) {
    for label in name.split('.').filter(|l| !l.is_empty()) {
        let bytes = &label.as_bytes()[..label.len().min(63)];
        out.push(bytes.len() as u8);
        out.extend_from_slice(bytes);
    }
    out.push(0);
}
