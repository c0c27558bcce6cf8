//! State sources: where the cluster state comes from. Each source feeds the
//! [`Replica`] (the agent's store) and nothing else; the reconciler reads the store.
//! Today's source is [`push`]: every node pushes its whole store to its peers over
//! TCP 7946 and pulls theirs back.

pub mod push;

use std::{net::SocketAddr, time::Instant};

use serde::{Deserialize, Serialize};

use crate::store::Store;

/// One node's view of the cluster, as exchanged between nodes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The sender's node name.
    pub node: String,
    /// The sender's store.
    pub store: Store,
}

/// What a state source needs from the node it runs in.
pub trait Replica: Send + Sync + 'static {
    /// This node's current view.
    fn snapshot(&self) -> Snapshot;
    /// Merges a peer's view; `sent_at` is when the snapshot we sent that peer in the
    /// same exchange was taken (the peer has seen everything we had then).
    fn absorb(&self, theirs: Snapshot, sent_at: Instant);
    /// Where to push: known members and the `--join` addresses.
    fn peers(&self) -> Vec<SocketAddr>;
    /// A receiver that changes whenever the local store does.
    fn changes(&self) -> tokio::sync::watch::Receiver<u64>;
}
