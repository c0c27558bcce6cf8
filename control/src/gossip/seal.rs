//! Sealing gossip with AES-256-GCM under the cluster keyring.
//!
//! A sealed message is `[version=1][key hint: 4 bytes][nonce: 12][ciphertext+tag]`.
//! The key hint (a 32-bit FNV-1a fingerprint of the key, not secret) lets a
//! receiver try the right key first; every installed key is tried, so during a
//! rotation both old and new keys are accepted. A message that no key opens is
//! dropped and counted. Replays of authentic packets are caught by [`ReplayGuard`].

use std::collections::HashMap;

use aes_gcm::{
    aead::{Aead, KeyInit, Payload},
    Aes256Gcm, Nonce,
};
use rand::RngCore;

/// Version byte of the sealed format.
pub const VERSION: u8 = 1;

/// Bytes sealing adds: version, key hint, nonce, tag.
pub const OVERHEAD: usize = 1 + 4 + 12 + 16;

/// A 256-bit cluster key.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(pub [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({:08x})", self.hint())
    }
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> Key {
        let mut k = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut k);
        Key(k)
    }

    /// A short, non-secret fingerprint used to pick the key on receipt.
    pub fn hint(&self) -> u32 {
        crate::hash::fnv1a_32(&self.0)
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Key, String> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return Err(format!("a key is 64 hex digits (32 bytes); got {} characters", s.len()));
        }
        let mut k = [0u8; 32];
        for (i, byte) in k.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| "a key is 64 hex digits".to_owned())?;
        }
        Ok(Key(k))
    }
}

/// The keys a node accepts, and the one it seals with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keyring {
    /// Accepted keys; `keys[primary]` seals.
    pub keys: Vec<Key>,
    /// Index of the sealing key.
    pub primary: usize,
}

/// Why a sealed message was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    /// Too short or wrong version.
    #[error("malformed sealed message")]
    Malformed,
    /// No installed key authenticates it.
    #[error("authentication failed (forged, corrupted or sealed with a key this node lacks)")]
    Auth,
}

impl Keyring {
    /// A keyring of one key.
    pub fn single(key: Key) -> Keyring {
        Keyring { keys: vec![key], primary: 0 }
    }

    /// Parses a keyring file: one hex key per line, the first is primary; `#` comments.
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let keys = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(Key::from_hex)
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err("the keyring holds no key".into());
        }
        Ok(Keyring { keys, primary: 0 })
    }

    /// The keyring file text: primary first.
    pub fn render(&self) -> String {
        let mut out = String::from("# meshd cluster keyring: one AES-256 key per line, the first seals\n");
        out.push_str(&self.keys[self.primary].to_hex());
        out.push('\n');
        for (i, k) in self.keys.iter().enumerate() {
            if i != self.primary {
                out.push_str(&k.to_hex());
                out.push('\n');
            }
        }
        out
    }

    /// The sealing key.
    pub fn primary(&self) -> &Key {
        &self.keys[self.primary]
    }

    /// Seals `plaintext` with the primary key.
    pub fn seal(&self, plaintext: &[u8]) -> Vec<u8> {
        let key = self.primary();
        let mut nonce = [0u8; 12];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        out.push(VERSION);
        out.extend_from_slice(&key.hint().to_be_bytes());
        out.extend_from_slice(&nonce);
        let header = out.clone();
        let cipher = Aes256Gcm::new_from_slice(&key.0).expect("32-byte key");
        let sealed = cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad: &header })
            .expect("AES-GCM sealing cannot fail for in-memory buffers");
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a sealed message with whichever installed key authenticates it.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < OVERHEAD || sealed[0] != VERSION {
            return Err(OpenError::Malformed);
        }
        let (header, body) = sealed.split_at(1 + 4 + 12);
        let hint = u32::from_be_bytes(header[1..5].try_into().expect("4 bytes"));
        let nonce = Nonce::from_slice(&header[5..17]);
        let mut keys: Vec<&Key> = self.keys.iter().collect();
        keys.sort_by_key(|k| k.hint() != hint);
        for key in keys {
            let cipher = Aes256Gcm::new_from_slice(&key.0).expect("32-byte key");
            if let Ok(plain) = cipher.decrypt(nonce, Payload { msg: body, aad: header }) {
                return Ok(plain);
            }
        }
        Err(OpenError::Auth)
    }
}

/// Rejects authentic packets seen before: per sender, the newest epoch (process start)
/// and a 64-packet sliding window of sequence numbers within it.
#[derive(Debug, Default)]
pub struct ReplayGuard {
    senders: HashMap<String, (u64, u64, u64)>,
}

impl ReplayGuard {
    /// Whether (`epoch`, `seq`) from `sender` is new; records it if so.
    pub fn accept(&mut self, sender: &str, epoch: u64, seq: u64) -> bool {
        let Some((known_epoch, top, window)) = self.senders.get_mut(sender) else {
            self.senders.insert(sender.to_owned(), (epoch, seq, 1));
            return true;
        };
        if epoch < *known_epoch {
            return false;
        }
        if epoch > *known_epoch {
            *known_epoch = epoch;
            *top = seq;
            *window = 1;
            return true;
        }
        if seq > *top {
            let shift = seq - *top;
            *window = if shift >= 64 { 1 } else { (*window << shift) | 1 };
            *top = seq;
            true
        } else {
            let age = *top - seq;
            if age >= 64 || *window & (1 << age) != 0 {
                false
            } else {
                *window |= 1 << age;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_refuses_tampering() {
        let ring = Keyring::single(Key::generate());
        let sealed = ring.seal(b"hello");
        assert_eq!(ring.open(&sealed).unwrap(), b"hello");
        let mut tampered = sealed.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert_eq!(ring.open(&tampered), Err(OpenError::Auth));
        assert_eq!(ring.open(&sealed[..10]), Err(OpenError::Malformed));
        let other = Keyring::single(Key::generate());
        assert_eq!(other.open(&sealed), Err(OpenError::Auth));
    }

    #[test]
    fn a_ring_with_old_and_new_keys_opens_both() {
        let (old, new) = (Key::generate(), Key::generate());
        let both = Keyring { keys: vec![old.clone(), new.clone()], primary: 0 };
        assert!(both.open(&Keyring::single(new).seal(b"x")).is_ok());
        assert!(both.open(&Keyring::single(old).seal(b"x")).is_ok());
    }

    #[test]
    fn keyring_file_round_trips() {
        let ring = Keyring { keys: vec![Key::generate(), Key::generate()], primary: 1 };
        let parsed = Keyring::parse(&ring.render()).unwrap();
        assert_eq!(parsed.primary(), ring.primary());
        assert_eq!(parsed.keys.len(), 2);
        assert!(Keyring::parse("# nothing\n").is_err());
        assert!(Keyring::parse("abcd\n").is_err());
    }

    #[test]
    fn replay_guard_accepts_each_packet_once() {
        let mut g = ReplayGuard::default();
        assert!(g.accept("a", 1, 10));
        assert!(!g.accept("a", 1, 10), "exact replay");
        assert!(g.accept("a", 1, 12));
        assert!(g.accept("a", 1, 11), "late but unseen");
        assert!(!g.accept("a", 1, 11));
        assert!(g.accept("a", 1, 200));
        assert!(!g.accept("a", 1, 100), "older than the window");
        assert!(!g.accept("a", 0, 500), "older epoch");
        assert!(g.accept("a", 2, 0), "restart");
    }
}
