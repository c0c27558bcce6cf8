//! The embedded DNS resolver on `127.0.0.11:53` in every attached container namespace.
//!
//! Owns: the answer path ([`answer()`], pure: bytes in, [`Action`] out), the name table
//! it reads ([`NameTable`] → [`NameIndex`], swapped whole through a [`TableHandle`]),
//! and the thin I/O shell ([`open_in_netns`], [`Resolver`]) with its forwarder. It must
//! not touch anything else in the namespace: it only binds sockets there.
//!
//! How control drives it: build a [`NameTable`] from the store and keep one
//! [`TableHandle`] per process (`update` on every change); per attached container,
//! `open_in_netns(netns, RESOLVER_ADDR, forward_netns)` then `Resolver::start(...)`
//! with the container's networks; `set_networks` when they change; drop or
//! `shutdown` on detach.

mod answer;
mod server;
mod table;
#[cfg(test)]
mod tests;

pub use answer::{
    answer, relay_reply, Action, AnswerConfig, Forward, Rcode, Transport, HOP_OPTION, UDP_PAYLOAD_MAX,
};
pub use server::{
    adopt_sockets, open_in_netns, usable_upstreams, Resolver, ResolverConfig, ResolverSockets, TableHandle,
    RESOLVER_ADDR,
};
pub use table::{EndpointMode, NameIndex, NameTable, NetworkNames, ServiceNames};
