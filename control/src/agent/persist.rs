//! What the agent keeps on disk: the replicated store (`STATE_DIR/store.json`) and the
//! cluster keyring. Nothing else in the agent touches these files.

use std::path::PathBuf;

use super::AgentConfig;
use crate::{gossip::seal::Keyring, store::Store, Error, Result};

/// Writes the keyring file (mode 0600) atomically.
pub fn write_keyring(path: &std::path::Path, ring: &Keyring) -> Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    file.write_all(ring.render().as_bytes())
        .map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("replacing {}", path.display()), e))
}

pub(super) fn state_file(cfg: &AgentConfig) -> PathBuf {
    cfg.state_dir.join("store.json")
}

pub(super) fn load_store(cfg: &AgentConfig) -> Result<Store> {
    let path = state_file(cfg);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            Error::invalid(format!(
                "{} is not a meshd store ({e}); move it away to start with an empty one",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Store::default()),
        Err(e) => Err(Error::io(format!("reading {}", path.display()), e)),
    }
}

pub(super) fn save_store(cfg: &AgentConfig, store: &Store) -> Result<()> {
    let path = state_file(cfg);
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(store).expect("stores always serialize");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(format!("replacing {}", path.display()), e))
}
