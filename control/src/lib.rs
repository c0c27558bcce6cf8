//! meshd's control side: the cluster model and its replicated store, the state
//! sources that fill it, the reconciler that turns it into dataplane operations, and
//! the local API that `meshctl` talks to. Control decides; it never opens a netlink
//! socket or a data socket itself — `meshd_dataplane` does.

pub mod agent;
pub mod api;
pub mod gossip;
pub mod hash;
pub mod health;
pub mod ipam;
pub mod limits;
pub mod model;
pub mod names;
pub mod reconcile;
pub mod source;
pub mod spec;
pub mod store;

/// Everything control can fail at. Messages name the object and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
    /// A file or socket operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The dataplane refused.
    #[error(transparent)]
    Dataplane(#[from] meshd_dataplane::Error),
}

impl Error {
    /// An [`Error::Invalid`] with this message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }

    /// An [`Error::Io`] for `what`.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }
}

/// Milliseconds since the Unix epoch on the wall clock (0 if the clock is before it):
/// the time that means the same on every node (epochs, save and send times).
pub fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Control's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
