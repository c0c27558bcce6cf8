//! What the agent keeps on disk: the replicated store (`STATE_DIR/store.json`) and the
//! cluster keyring. Nothing else in the agent touches these files.
//!
//! Both hold keys (the store carries the keyring a rotation distributed), so both are
//! written 0600 inside a 0700 directory, and always atomically and durably: a temp
//! file in the same directory, fsync, rename, fsync of the directory. A power loss
//! leaves either the old file or the new one, never an empty or torn one.

use std::{
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::AgentConfig;
use crate::{
    gossip::{seal::Keyring, Gossip, Millis},
    store::Store,
    Error, Result,
};

/// Writes `bytes` to `path` atomically and durably, readable by the owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // A unique temp name: two writers (or a crashed earlier one) never share a file.
    let tmp = dir.join(format!(".{name}.tmp-{}-{:x}", std::process::id(), rand::random::<u64>()));
    let written = (|| -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(format!("writing {} durably", path.display()), e)
    })
}

/// Writes the keyring file (mode 0600) atomically and durably.
pub fn write_keyring(path: &Path, ring: &Keyring) -> Result<()> {
    write_private(path, ring.render().as_bytes())
}

/// Makes sure `dir` exists and only its owner can enter it: creates it 0700, or
/// tightens an existing directory that others can read (with a warning returned).
/// Policy: fix with a warning rather than refuse, because meshd itself wrote these
/// files and a permissive umask is the usual cause; the warning says what was exposed.
pub fn secure_dir(dir: &Path) -> Result<Option<String>> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io(format!("creating --state-dir {}", dir.display()), e))?;
        // `recursive` applies the mode to every created level, and the umask may have
        // masked it: set it on the leaf explicitly.
        return tighten(dir, 0o700).map(|_| None);
    }
    Ok(tighten(dir, 0o700)?.map(|old| {
        format!(
            "state dir {} was mode {old:o} (other users could list it); changed it to 0700",
            dir.display()
        )
    }))
}

/// Tightens an existing file holding keys to 0600 if group or others could read it;
/// returns a warning naming what may have leaked. A missing file is fine.
pub fn secure_key_file(path: &Path) -> Result<Option<String>> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(tighten(path, 0o600)?.map(|old| {
        format!(
            "{} was mode {old:o}: other users could read the cluster keys in it; changed it to 0600. \
             If untrusted users had access, install a fresh key on every node with `meshctl key install`",
            path.display()
        )
    }))
}

/// Sets `mode` on `path` if its group/other bits are set; returns the old mode then.
fn tighten(path: &Path, mode: u32) -> Result<Option<u32>> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    let old = meta.permissions().mode() & 0o7777;
    if old & 0o077 == 0 {
        return Ok(None);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {mode:o} {}", path.display()), e))?;
    Ok(Some(old))
}

/// The store file: the store and when it was saved.
#[derive(Deserialize)]
struct Persisted {
    /// Wall-clock milliseconds since the Unix epoch at the save.
    saved_at_ms: u64,
    store: Store,
}

/// The file as read: the current format, or a bare store (written before the
/// save time was recorded; treated as saved just now).
#[derive(Deserialize)]
#[serde(untagged)]
enum OnDisk {
    Persisted(Persisted),
    Bare(Store),
}

/// What the agent starts from.
#[derive(Debug, Default)]
pub(super) struct Loaded {
    /// The store (empty when there was none, or it was corrupt).
    pub store: Store,
    /// When it was saved (wall clock, ms since the Unix epoch), if known.
    pub saved_at_ms: Option<u64>,
    /// Where a corrupt store was moved, and why.
    pub recovered: Option<String>,
}

pub(super) fn state_file(cfg: &AgentConfig) -> PathBuf {
    cfg.state_dir.join("store.json")
}

/// Reads the store; a corrupt one is moved aside (never deleted), reported, and the
/// node starts empty: it rebuilds from the cluster by push-pull.
pub(super) fn load_store(cfg: &AgentConfig) -> Result<Loaded> {
    let path = state_file(cfg);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::default()),
        Err(e) => return Err(Error::io(format!("reading {}", path.display()), e)),
    };
    match serde_json::from_slice::<OnDisk>(&bytes) {
        Ok(OnDisk::Persisted(p)) => {
            Ok(Loaded { store: p.store, saved_at_ms: Some(p.saved_at_ms), recovered: None })
        }
        Ok(OnDisk::Bare(store)) => Ok(Loaded { store, saved_at_ms: None, recovered: None }),
        Err(error) => {
            let aside = path.with_file_name(format!("store.json.corrupt-{}", crate::wall_clock_ms() / 1000));
            std::fs::rename(&path, &aside).map_err(|e| {
                Error::io(
                    format!("moving the corrupt store {} aside to {}", path.display(), aside.display()),
                    e,
                )
            })?;
            let message = format!(
                "store {} was corrupt ({error}); moved it to {} and started empty, rebuilding from the cluster",
                path.display(),
                aside.display()
            );
            tracing::error!("{message}");
            Ok(Loaded { store: Store::default(), saved_at_ms: None, recovered: Some(message) })
        }
    }
}

/// Persists the store (0600, atomic, durable), stamped with the save time.
pub(super) fn save_store(cfg: &AgentConfig, store: &Store) -> Result<()> {
    /// [`Persisted`] borrowing the store: saving does not copy it.
    #[derive(Serialize)]
    struct PersistedRef<'a> {
        saved_at_ms: u64,
        store: &'a Store,
    }
    let persisted = PersistedRef { saved_at_ms: crate::wall_clock_ms(), store };
    let bytes = serde_json::to_vec(&persisted).expect("stores always serialize");
    write_private(&state_file(cfg), &bytes)
}

/// A node whose store was saved longer ago than the tombstone TTL may hold entries
/// whose deletion the cluster has already forgotten: it must resync before its old
/// entries count (see [`Gossip::resync_loaded`]).
pub(super) fn resync_if_stale(gossip: &mut Gossip, loaded: &Loaded, ttl: Millis, now: Millis) {
    let Some(saved) = loaded.saved_at_ms else { return };
    let away = crate::wall_clock_ms().saturating_sub(saved);
    if away > ttl {
        tracing::warn!(
            away_secs = away / 1000,
            "the store was saved longer ago than the tombstone TTL; its entries count only after a resync with the cluster"
        );
        gossip.resync_loaded(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_writes_are_0600_and_replace_atomically() {
        let dir = std::env::temp_dir().join(format!("meshd-persist-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert!(secure_dir(&dir).unwrap().is_none());
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        let file = dir.join("store.json");
        write_private(&file, b"one").unwrap();
        write_private(&file, b"two").unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        // Nothing but the file is left in the directory.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(secure_key_file(&file).unwrap().unwrap().contains("meshctl key install"));
        assert!(secure_dir(&dir).unwrap().is_some());
        assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777, 0o700);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
