//! State sources: where the cluster state comes from. A source fills the replicated
//! store and the membership view; the agent's reconciler only reads them.
//!
//! Today's source is [`gossip`]: SWIM membership and piggybacked store deltas over
//! UDP 7946, with TCP 7946 push-pull for joins and anti-entropy, all sealed with the
//! cluster keyring.

pub mod gossip;
