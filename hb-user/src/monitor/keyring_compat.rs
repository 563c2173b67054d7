//! The monitor's keyring: master secrets by epoch, and node keys derived
//! from them (`PROTOCOL.md`, "Keys").
//!
//! MERGE NOTE: `hb::keys` (the `hb keys` subcommand, issue 3 item 1) is
//! written in parallel and will own the keyring format and derivation.
//! This module implements the same contract so the monitor works on its own
//! branch; at merge, [`load_keyring`] and [`derive_node_key`] become thin
//! re-exports of `hb::keys` (or this file goes and the monitor imports
//! `hb::keys` directly). The test vectors below pin the behaviour both must
//! share.
//!
//! File format (TOML):
//!
//! ```toml
//! [[epoch]]
//! id = 1
//! secret = "000102...1f"   # 64 hex digits = 32 bytes
//! ```
//!
//! The monitor holds the newest two epochs per node (the dataplane has two
//! key slots per node), so rotation is: add epoch N+1 and SIGHUP, move the
//! senders to it, remove epoch N and SIGHUP.

use std::path::{Path, PathBuf};

use crate::keys::NodeKeyDeriver;
use hb_common::{NodeKey, maps::NodeKeys};

/// HKDF salt of node keys.
pub const SALT: &[u8] = crate::keys::NODE_KEY_SALT;

/// Errors of loading a keyring: each names the file and the problem.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    // The cause is part of the message, so it is not also a `source`
    // (anyhow's `{:#}` would print it twice).
    #[error("cannot read keyring {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("keyring {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
}

/// One epoch's master secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Epoch {
    pub id: u8,
    pub secret: [u8; 32],
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("Epoch").field("id", &self.id).finish()
    }
}

/// A loaded keyring: epochs sorted by id, newest last.
#[derive(Clone)]
pub struct Keyring {
    epochs: Vec<Epoch>,
    /// HKDF's extract step of each held epoch (newest first): it depends
    /// on the secret only, so deriving a node key costs one expand.
    held: Vec<(u8, NodeKeyDeriver)>,
}

impl PartialEq for Keyring {
    fn eq(&self, other: &Keyring) -> bool {
        self.epochs == other.epochs
    }
}

impl Eq for Keyring {}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("epochs", &self.epochs)
            .finish()
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    epoch: Vec<FileEpoch>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEpoch {
    id: i64,
    secret: String,
}

/// Loads and validates a keyring file.
pub fn load_keyring(path: &Path) -> Result<Keyring, KeyringError> {
    let text = std::fs::read_to_string(path).map_err(|cause| KeyringError::Read {
        path: path.to_owned(),
        cause,
    })?;
    parse_keyring(&text).map_err(|msg| KeyringError::Invalid {
        path: path.to_owned(),
        msg,
    })
}

/// Parses keyring text; the error is one line.
pub fn parse_keyring(text: &str) -> Result<Keyring, String> {
    let file: File = toml::from_str(text).map_err(|e| super::config::toml_error(text, &e))?;
    if file.epoch.is_empty() {
        return Err("no [[epoch]] with an id and a secret".into());
    }
    let mut epochs = Vec::with_capacity(file.epoch.len());
    for e in file.epoch {
        let id = u8::try_from(e.id).map_err(|_| format!("epoch id {} is outside 0..=255", e.id))?;
        let s = e.secret.trim();
        if s.len() != 64 {
            return Err(format!(
                "epoch {id}: secret must be 64 hex digits (32 bytes), got {} characters",
                s.len()
            ));
        }
        let mut secret = [0u8; 32];
        hex::decode_to_slice(s, &mut secret)
            .map_err(|e| format!("epoch {id}: secret is not hex: {e}"))?;
        if epochs.iter().any(|x: &Epoch| x.id == id) {
            return Err(format!("epoch {id} appears twice"));
        }
        epochs.push(Epoch { id, secret });
    }
    Ok(Keyring::new(epochs))
}

/// `HKDF-SHA256(salt = "hb-v1 node key", ikm = secret, info = node_id BE ||
/// epoch, L = 16)`: `hb::keys`' derivation, the one implementation.
pub fn derive_node_key(secret: &[u8; 32], node_id: u32, epoch: u8) -> [u8; 16] {
    crate::keys::derive_node_key(secret, node_id, epoch)
}

impl Keyring {
    /// A keyring of `epochs` (any order; ids must be distinct).
    pub fn new(mut epochs: Vec<Epoch>) -> Keyring {
        epochs.sort_by_key(|e| e.id);
        let held = epochs
            .iter()
            .rev()
            .take(2)
            .map(|e| (e.id, NodeKeyDeriver::new(&e.secret)))
            .collect();
        Keyring { epochs, held }
    }

    pub fn epochs(&self) -> &[Epoch] {
        &self.epochs
    }

    /// The node's keys for the newest two epochs, at slot 0 (the caller
    /// sets the slot). `key[0]` is the newest.
    pub fn node_keys(&self, node_id: u32) -> NodeKeys {
        let mut k = NodeKeys::default();
        for (i, (id, prk)) in self.held.iter().enumerate() {
            k.epoch[i] = *id;
            k.key[i] = NodeKey::from_bytes(&prk.derive(node_id, *id));
            k.valid |= 1 << i;
        }
        k
    }

    /// Epoch ids held for nodes (the newest two), newest first.
    pub fn held_epochs(&self) -> Vec<u8> {
        self.held.iter().map(|(id, _)| *id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> [u8; 32] {
        std::array::from_fn(|i| i as u8)
    }

    #[test]
    fn protocol_test_vectors() {
        assert_eq!(
            hex::encode(derive_node_key(&secret(), 42, 1)),
            "6df25b19dd0205345e893133518757d6"
        );
        assert_eq!(
            hex::encode(derive_node_key(&secret(), 1, 0)),
            "fd637554fc564d73044384760801da17"
        );
    }

    const HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[test]
    fn newest_two_epochs_are_held() {
        let text = format!(
            "[[epoch]]\nid = 3\nsecret = \"{HEX}\"\n[[epoch]]\nid = 1\nsecret = \"{HEX}\"\n[[epoch]]\nid = 2\nsecret = \"{HEX}\"\n"
        );
        let k = parse_keyring(&text).unwrap();
        assert_eq!(k.held_epochs(), vec![3, 2]);
        let nk = k.node_keys(42);
        assert_eq!((nk.epoch, nk.valid), ([3, 2], 0b11));
        assert!(nk.find(1).is_none());
        let one = parse_keyring(&format!("[[epoch]]\nid = 1\nsecret = \"{HEX}\"\n")).unwrap();
        let nk = one.node_keys(42);
        assert_eq!(nk.valid, 0b01);
        assert_eq!(
            nk.find(1).unwrap().to_bytes(),
            derive_node_key(&secret(), 42, 1)
        );
    }

    #[test]
    fn bad_keyrings_say_what_is_wrong() {
        let cases = [
            ("", "no [[epoch]]"),
            ("[[epoch]]\nid = 1\nsecret = \"abcd\"\n", "64 hex digits"),
            (
                &format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", "zz".repeat(32)),
                "not hex",
            ),
            (
                &format!("[[epoch]]\nid = 300\nsecret = \"{HEX}\"\n"),
                "outside 0..=255",
            ),
            (
                &format!(
                    "[[epoch]]\nid = 1\nsecret = \"{HEX}\"\n[[epoch]]\nid = 1\nsecret = \"{HEX}\"\n"
                ),
                "appears twice",
            ),
            ("[[epoch]]\nid = 1\n", "missing field `secret`"),
            ("this is not toml", "line 1"),
            (
                &format!("[[epoch]]\nid = 1\nsecret = \"{HEX}\"\ncolour = 3\n"),
                "unknown field `colour`",
            ),
        ];
        for (text, want) in cases {
            let e = parse_keyring(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}");
            assert!(!e.contains('\n'), "one line: {e:?}");
        }
    }
}
