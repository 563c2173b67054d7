//! Keys: the cluster's master secrets (a keyring of epochs) and the node
//! keys derived from them (`PROTOCOL.md`, "Keys").
//!
//! The master secret lives only on monitors. Every node holds just its own
//! 16-byte node key, `HKDF-SHA256(salt = "hb-v1 node key", ikm = secret,
//! info = node_id BE32 || epoch)`, so one compromised sender can forge no
//! other node's heartbeats. The keyring holds one secret per epoch; the
//! monitor loads the node keys of the newest two epochs into the kernel,
//! which is what lets an operator rotate keys without losing a heartbeat
//! (add epoch N+1, move senders over, remove epoch N).
//!
//! Epoch ids are one byte and wrap: after 255 comes 0. "Newest" is
//! therefore serial-number order (RFC 1982, [`is_newer`]), not numeric
//! order, and a keyring whose epochs do not lie within 128 consecutive ids
//! is refused: their order would be ambiguous.
//!
//! The keyring file is TOML:
//!
//! ```toml
//! [[epoch]]
//! id = 1
//! secret = "<64 hex digits>"
//! ```
//!
//! Secrets never appear in errors or logs: [`Secret`]'s `Debug` is
//! redacted, and TOML errors are reported by position, not by the offending
//! line's text, with every value the parser quotes hidden ([`redact`]).
//! The file itself must be private to its owner (mode 0600 or 0400, as ssh
//! asks of a private key): one that its group or others may read is
//! refused.

use std::{
    fmt,
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use hb_common::{NodeKey, maps::NodeKeys};
use ring::{hkdf, rand::SecureRandom as _};
use serde::Deserialize;

/// HKDF salt of node-key derivation (`PROTOCOL.md`).
pub const NODE_KEY_SALT: &[u8] = b"hb-v1 node key";
/// Length of a master secret in bytes (64 hex digits).
pub const SECRET_LEN: usize = 32;
/// Length of a node key in bytes (32 hex digits).
pub const NODE_KEY_LEN: usize = 16;

/// A master secret. `Debug` never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub [u8; SECRET_LEN]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Why a keyring could not be loaded. Every variant names the file; none
/// carries secret material.
#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    /// The I/O error is part of the message, not a `source`: printed
    /// with its causes (`{:#}`), it would otherwise appear twice.
    #[error("cannot read keyring {path}: {io}")]
    Unreadable { path: PathBuf, io: std::io::Error },
    #[error(
        "keyring {path} has mode {mode:04o}: users other than its owner may get at the master secrets; run `chmod 600 {path}`"
    )]
    NotPrivate { path: PathBuf, mode: u32 },
    #[error("keyring {path} holds more than {max} bytes: it is no keyring")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("keyring {path} is not valid TOML{at}: {message}")]
    Toml {
        path: PathBuf,
        /// ` at line L, column C`, or empty.
        at: String,
        message: String,
    },
    /// Valid TOML that is no keyring: an unknown or missing field, a
    /// value of the wrong type or out of range.
    #[error("keyring {path}{at}: {message}")]
    Content {
        path: PathBuf,
        /// ` at line L, column C`, or empty.
        at: String,
        message: String,
    },
    #[error("keyring {path}: epoch {epoch}: secret {problem}")]
    BadSecret {
        path: PathBuf,
        epoch: u8,
        problem: HexError,
    },
    #[error("keyring {path}: epoch {epoch} appears more than once")]
    DuplicateEpoch { path: PathBuf, epoch: u8 },
    #[error("keyring {path} has no [[epoch]] table")]
    NoEpochs { path: PathBuf },
    #[error(
        "keyring {path}: epochs {have} do not lie within 128 consecutive ids (after 255 comes 0), so which is newest is ambiguous; remove the old ones"
    )]
    EpochsTooFarApart { path: PathBuf, have: String },
    #[error("keyring {path} has no epoch {epoch} (it has {have})")]
    NoSuchEpoch {
        path: PathBuf,
        epoch: u8,
        have: String,
    },
}

/// What is wrong with a hex string (never the string itself: it may be a
/// secret).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HexError {
    #[error("must be {want} hex digits ({} bytes), got {got} characters", want / 2)]
    Length { want: usize, got: usize },
    #[error("must be hex digits only: character {at} is not one")]
    NotHex { at: usize },
}

/// Parses exactly `2 * N` hex digits (either case) into `N` bytes.
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], HexError> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return Err(HexError::Length {
            want: 2 * N,
            got: s.chars().count(),
        });
    }
    let digit = |i: usize| -> Result<u8, HexError> {
        match b[i] {
            c @ b'0'..=b'9' => Ok(c - b'0'),
            c @ b'a'..=b'f' => Ok(c - b'a' + 10),
            c @ b'A'..=b'F' => Ok(c - b'A' + 10),
            _ => Err(HexError::NotHex { at: i + 1 }),
        }
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(2 * i)? << 4 | digit(2 * i + 1)?;
    }
    Ok(out)
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// Derives node keys under one master secret (`PROTOCOL.md`, "Keys"):
/// the HKDF extract step runs once, so deriving a whole fleet's keys costs
/// one expand per node.
#[derive(Clone)]
pub struct NodeKeyDeriver(hkdf::Prk);

impl NodeKeyDeriver {
    pub fn new(secret: &[u8; SECRET_LEN]) -> NodeKeyDeriver {
        NodeKeyDeriver(hkdf::Salt::new(hkdf::HKDF_SHA256, NODE_KEY_SALT).extract(secret))
    }

    /// The node key of `(node_id, epoch)`.
    pub fn derive(&self, node_id: u32, epoch: u8) -> [u8; NODE_KEY_LEN] {
        let [a, b, c, d] = node_id.to_be_bytes();
        let info = [a, b, c, d, epoch];
        let mut out = [0u8; NODE_KEY_LEN];
        // 16 bytes is far below HKDF-SHA256's limit of 255 * 32: cannot fail.
        self.0
            .expand(&[&info], Len(NODE_KEY_LEN))
            .and_then(|okm| okm.fill(&mut out))
            .expect("HKDF-SHA256 expands 16 bytes");
        out
    }
}

/// The node key of `(node_id, epoch)` under `secret` (`PROTOCOL.md`).
pub fn derive_node_key(secret: &[u8; SECRET_LEN], node_id: u32, epoch: u8) -> [u8; NODE_KEY_LEN] {
    NodeKeyDeriver::new(secret).derive(node_id, epoch)
}

/// A fresh master secret from the operating system's CSPRNG.
pub fn new_secret() -> anyhow::Result<Secret> {
    let mut s = [0u8; SECRET_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut s)
        .map_err(|_| anyhow::anyhow!("the system random number generator failed"))?;
    Ok(Secret(s))
}

/// Whether epoch `a` is newer than epoch `b`. Epoch ids count modulo 256
/// (after 255 comes 0) and compare as serial numbers (RFC 1982): `a` is
/// newer when it lies 1 to 127 ids after `b`. Two ids 128 apart are
/// unordered, which is why a keyring's epochs must lie within 128
/// consecutive ids.
pub fn is_newer(a: u8, b: u8) -> bool {
    matches!(a.wrapping_sub(b), 1..=127)
}

/// What stands in for a value the parser quoted.
const HIDDEN: &str = "(not shown)";

/// Said instead of a parser message that still looks as if it could carry
/// secret material after [`redact`].
const WITHHELD: &str = "the file does not match the keyring format (the parser's message is withheld: it could contain a secret)";

/// The longest run of hex digits a quoted span may hold and be shown: too
/// short to be any useful part of a 64-digit secret, long enough for an
/// epoch id (`256`) or a field name (`secret`).
const SHOWN_HEX_RUN: usize = 3;

/// The parser's message without anything that could be secret material.
/// serde and toml quote values: strings as `"…"` (every one is hidden),
/// other values, field names and TOML tokens in backquotes (shown only
/// when at most 24 characters with no more than three hex digits in a row:
/// `secrt`, `id`, `256`, `=`; not `abab…`, not `1234567890`). A message
/// that still holds a long token afterwards is replaced whole by a fixed
/// text.
fn redact(message: &str) -> String {
    let hex_run = |s: &str| {
        s.split(|c: char| !c.is_ascii_hexdigit())
            .map(str::len)
            .max()
            .unwrap_or(0)
    };
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(i) = rest.find(['"', '`']) {
        out.push_str(&rest[..i]);
        let quote = rest.as_bytes()[i] as char;
        let body = &rest[i + 1..];
        // A string is quoted by `Debug`: `\"` does not close it.
        let mut end = None;
        let mut escaped = false;
        for (j, c) in body.char_indices() {
            if escaped {
                escaped = false;
            } else if c == '\\' && quote == '"' {
                escaped = true;
            } else if c == quote {
                end = Some(j);
                break;
            }
        }
        let Some(end) = end else {
            // Unterminated: everything after the quote is hidden.
            out.push_str(HIDDEN);
            rest = "";
            break;
        };
        let content = &body[..end];
        if quote == '`' && content.chars().count() <= 24 && hex_run(content) <= SHOWN_HEX_RUN {
            out.push('`');
            out.push_str(content);
            out.push('`');
        } else {
            out.push_str(HIDDEN);
        }
        rest = &body[end + 1..];
    }
    out.push_str(rest);
    let out = out.trim().replace(['\n', '\r'], " ");
    let long_token = out
        .split(|c: char| !c.is_alphanumeric())
        .any(|w| w.chars().count() >= 16 || hex_run(w) >= 8);
    if long_token { WITHHELD.to_owned() } else { out }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyringFile {
    #[serde(default)]
    epoch: Vec<EpochEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochEntry {
    #[serde(deserialize_with = "epoch_id")]
    id: u8,
    secret: String,
}

/// An epoch id, 0 to 255, with an error that says so (serde's says
/// `expected u8`).
fn epoch_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    struct Id;
    impl serde::de::Visitor<'_> for Id {
        type Value = u8;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an epoch id (0 to 255)")
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u8, E> {
            u8::try_from(v)
                .map_err(|_| E::custom(format!("epoch id {v} is out of range: ids are 0 to 255")))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u8, E> {
            u8::try_from(v)
                .map_err(|_| E::custom(format!("epoch id {v} is out of range: ids are 0 to 255")))
        }
    }
    d.deserialize_u8(Id)
}

/// The master secrets of every epoch, from a keyring file: what `hb keys
/// derive` reads and what the monitor holds (and re-reads on SIGHUP).
#[derive(Clone)]
pub struct Keyring {
    path: PathBuf,
    /// Oldest first ([`is_newer`]); epochs are unique and lie within 128
    /// consecutive ids.
    epochs: Vec<(u8, Secret)>,
    /// HKDF's extract step of the newest two epochs (newest first), the
    /// ones the dataplane holds per node: deriving a node's keys for the
    /// kernel then costs one expand per epoch, which matters for a fleet.
    held: Vec<(u8, NodeKeyDeriver)>,
}

/// Two keyrings are equal when they hold the same secrets under the same
/// epochs, wherever they were read from (a reload that changes no secret
/// re-keys nothing).
impl PartialEq for Keyring {
    fn eq(&self, other: &Keyring) -> bool {
        self.epochs == other.epochs
    }
}

impl Eq for Keyring {}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("epochs", &self.epochs())
            .finish_non_exhaustive()
    }
}

/// Whether `file` (of `mode`, whose group or other bits are set) has a
/// POSIX ACL that grants nothing to others, nothing to its group or any
/// named group, and to named users only this process's effective user:
/// the group bits of `mode` are then the ACL's mask, not access for a
/// group. No ACL, or one that cannot be read or parsed: not private.
fn acl_is_ours_alone(file: &std::fs::File, mode: u32) -> bool {
    use std::os::fd::AsRawFd as _;
    if mode & 0o007 != 0 {
        return false;
    }
    let mut buf = [0u8; 4 + 8 * 32];
    // SAFETY: a valid fd, a NUL-terminated name, and a buffer of its
    // length; the kernel writes at most that many bytes.
    let n = unsafe {
        libc::fgetxattr(
            file.as_raw_fd(),
            c"system.posix_acl_access".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    let Ok(n) = usize::try_from(n) else {
        return false;
    };
    // SAFETY: geteuid(2) cannot fail.
    let uid = unsafe { libc::geteuid() };
    acl_grants_only(&buf[..n], uid)
}

/// [`acl_is_ours_alone`] on the xattr's bytes (`posix_acl_xattr_header`
/// version 2, then entries of tag, permissions, id, little-endian).
fn acl_grants_only(acl: &[u8], uid: u32) -> bool {
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const GROUP: u16 = 0x08;
    const OTHER: u16 = 0x20;
    let Some((version, entries)) = acl.split_first_chunk::<4>() else {
        return false;
    };
    if u32::from_le_bytes(*version) != 2 || entries.len() % 8 != 0 || entries.is_empty() {
        return false;
    }
    entries.chunks_exact(8).all(|e| {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        match tag {
            USER => perm == 0 || id == uid,
            GROUP_OBJ | GROUP | OTHER => perm == 0,
            // The owner, and the mask (which grants nothing by itself).
            _ => true,
        }
    })
}

/// The most a keyring may hold: 256 epochs of a 64-digit secret take
/// about 30 KB.
pub const KEYRING_MAX: u64 = 1 << 20;

/// Why [`read_private`] refused or failed.
#[derive(Debug)]
pub enum PrivateFileError {
    Io(std::io::Error),
    /// A regular file whose group or others have some access (its mode).
    NotPrivate {
        mode: u32,
    },
    /// More than the given bytes.
    TooLarge {
        max: u64,
    },
}

/// Reads a file that holds secrets (a keyring, a node key): refused if it
/// is a regular file whose mode grants its group or others any access,
/// before anything is read, and if it holds more than `max` bytes (so
/// that `/dev/zero` is an error, not a process that eats the host's
/// memory). The mode checked is that of what was opened, not of whatever
/// the path names by now; pipes and devices (`/dev/stdin`) are not files
/// at rest, and their modes say nothing about who can read the secrets.
///
/// A POSIX ACL that grants access to this process's own user alone is
/// private too: systemd's `LoadCredential=` makes a credential 0400 and
/// gives the service's (dynamic) user read access by an ACL entry, which
/// `stat` shows as group bits (0440).
pub fn read_private(path: &Path, max: u64) -> Result<Vec<u8>, PrivateFileError> {
    let file = std::fs::File::open(path).map_err(PrivateFileError::Io)?;
    let meta = file.metadata().map_err(PrivateFileError::Io)?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.is_file() && mode & 0o077 != 0 && !acl_is_ours_alone(&file, mode) {
        return Err(PrivateFileError::NotPrivate { mode });
    }
    let mut bytes = Vec::new();
    file.take(max.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(PrivateFileError::Io)?;
    if bytes.len() as u64 > max {
        return Err(PrivateFileError::TooLarge { max });
    }
    Ok(bytes)
}

impl Keyring {
    /// Reads and checks a keyring file. A regular file whose mode grants
    /// its group or others any access is refused before it is read.
    pub fn load(path: impl AsRef<Path>) -> Result<Keyring, KeyringError> {
        let path = path.as_ref().to_path_buf();
        let bytes = read_private(&path, KEYRING_MAX).map_err(|e| match e {
            PrivateFileError::Io(io) => KeyringError::Unreadable {
                path: path.clone(),
                io,
            },
            PrivateFileError::NotPrivate { mode } => KeyringError::NotPrivate {
                path: path.clone(),
                mode,
            },
            PrivateFileError::TooLarge { max } => KeyringError::TooLarge {
                path: path.clone(),
                max,
            },
        })?;
        let text = String::from_utf8(bytes).map_err(|_| KeyringError::Unreadable {
            path: path.clone(),
            io: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"),
        })?;
        Keyring::parse(&path, &text)
    }

    /// Parses keyring text; `path` is for messages.
    pub fn parse(path: &Path, text: &str) -> Result<Keyring, KeyringError> {
        let file: KeyringFile = toml::from_str(text).map_err(|e| {
            // Not `e.to_string()`: it quotes the offending line, which may
            // be a secret.
            let at = e
                .span()
                .map(|s| {
                    let before = &text[..s.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(" at line {line}, column {col}")
                })
                .unwrap_or_default();
            // Nor the message as it is: serde's quotes the offending
            // value (`invalid type: string "…", expected a string`).
            let message = redact(e.message());
            let path = path.to_path_buf();
            // Only TOML that does not parse is invalid TOML: the rest
            // is valid TOML that is no keyring (an id of 300, say).
            if text.parse::<toml::Table>().is_err() {
                KeyringError::Toml { path, at, message }
            } else {
                KeyringError::Content { path, at, message }
            }
        })?;
        let mut epochs: Vec<(u8, Secret)> = Vec::with_capacity(file.epoch.len());
        for entry in file.epoch {
            let secret = parse_hex::<SECRET_LEN>(entry.secret.trim()).map_err(|problem| {
                KeyringError::BadSecret {
                    path: path.to_path_buf(),
                    epoch: entry.id,
                    problem,
                }
            })?;
            epochs.push((entry.id, Secret(secret)));
        }
        Keyring::from_secrets(path, epochs)
    }

    /// A keyring of `epochs` (any order); `path` is for messages. Errors
    /// when an epoch appears twice, there is none, or they do not lie
    /// within 128 consecutive ids (modulo 256), so that which is newest
    /// would be ambiguous.
    pub fn from_secrets(
        path: impl Into<PathBuf>,
        epochs: impl IntoIterator<Item = (u8, Secret)>,
    ) -> Result<Keyring, KeyringError> {
        let path = path.into();
        let mut sorted: Vec<(u8, Secret)> = Vec::new();
        for (id, secret) in epochs {
            if sorted.iter().any(|(e, _)| *e == id) {
                return Err(KeyringError::DuplicateEpoch { path, epoch: id });
            }
            sorted.push((id, secret));
        }
        if sorted.is_empty() {
            return Err(KeyringError::NoEpochs { path });
        }
        // The oldest epoch is the one every other is newer than; there is
        // at most one (two such would each be newer than the other).
        let oldest = sorted
            .iter()
            .map(|(id, _)| *id)
            .find(|&o| sorted.iter().all(|(id, _)| *id == o || is_newer(*id, o)));
        let Some(oldest) = oldest else {
            sorted.sort_by_key(|(id, _)| *id);
            return Err(KeyringError::EpochsTooFarApart {
                path,
                have: list(sorted.iter().map(|(id, _)| *id)),
            });
        };
        sorted.sort_by_key(|(id, _)| id.wrapping_sub(oldest));
        let held = sorted
            .iter()
            .rev()
            .take(2)
            .map(|(id, s)| (*id, NodeKeyDeriver::new(&s.0)))
            .collect();
        Ok(Keyring {
            path,
            epochs: sorted,
            held,
        })
    }

    /// The file this keyring came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Epoch ids, oldest first ([`is_newer`]: `[255, 0]` across the wrap).
    /// Never empty.
    pub fn epochs(&self) -> Vec<u8> {
        self.epochs.iter().map(|(id, _)| *id).collect()
    }

    /// The newest epoch ([`is_newer`]; 0 in a keyring of 255 and 0): what
    /// a sender uses by default.
    pub fn newest(&self) -> u8 {
        self.epochs.last().expect("a keyring has epochs").0
    }

    fn secret(&self, epoch: u8) -> Result<&Secret, KeyringError> {
        self.epochs
            .iter()
            .find(|(id, _)| *id == epoch)
            .map(|(_, s)| s)
            .ok_or_else(|| KeyringError::NoSuchEpoch {
                path: self.path.clone(),
                epoch,
                have: list(self.epochs.iter().map(|(id, _)| *id)),
            })
    }

    /// The node key of `node_id` at `epoch`.
    pub fn node_key(&self, node_id: u32, epoch: u8) -> Result<NodeKey, KeyringError> {
        let s = self.secret(epoch)?;
        Ok(NodeKey::from_bytes(&derive_node_key(&s.0, node_id, epoch)))
    }

    /// The kernel's key entry for `node_id`: keys of the newest two epochs
    /// (`key[0]` the newest). `slot` is 0: the caller assigns slots.
    pub fn node_keys(&self, node_id: u32) -> NodeKeys {
        let mut k = NodeKeys::default();
        for (i, (epoch, deriver)) in self.held.iter().enumerate() {
            k.epoch[i] = *epoch;
            k.key[i] = NodeKey::from_bytes(&deriver.derive(node_id, *epoch));
            k.valid |= 1 << i;
        }
        k
    }

    /// The epochs whose keys the dataplane holds per node (the newest
    /// two), newest first.
    pub fn held_epochs(&self) -> Vec<u8> {
        self.held.iter().map(|(id, _)| *id).collect()
    }
}

/// `a, b, c`: epoch ids for a message.
fn list(ids: impl Iterator<Item = u8>) -> String {
    ids.map(|id| id.to_string()).collect::<Vec<_>>().join(", ")
}

/// `hb keys`.
#[derive(clap::Subcommand, Debug)]
pub enum Cmd {
    /// Print a fresh master secret (64 hex digits) for a keyring's
    /// `[[epoch]]` table. Keep it on monitors only.
    New,
    /// Print a node's key (32 hex digits), for `hb send --key`.
    Derive {
        /// Keyring file (TOML, `[[epoch]]` tables with `id` and `secret`).
        #[arg(long, value_name = "FILE")]
        keyring: PathBuf,
        /// The node's id (1 to 4294967295).
        #[arg(long, value_name = "N", value_parser = parse_node_id)]
        node_id: u32,
        /// Key epoch; default: the keyring's newest.
        #[arg(long, value_name = "E")]
        epoch: Option<u8>,
    },
}

/// Clap parser for a node id: a `u32` other than 0.
pub fn parse_node_id(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("node id 0 is reserved; use 1 to 4294967295".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("`{s}` is not a node id (1 to 4294967295)")),
    }
}

pub fn run(cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::New => {
            crate::output::stdout(&format!("{}\n", to_hex(&new_secret()?.0)))?;
        }
        Cmd::Derive {
            keyring,
            node_id,
            epoch,
        } => {
            let ring = Keyring::load(&keyring)?;
            let epoch = epoch.unwrap_or_else(|| ring.newest());
            let key = ring
                .node_key(node_id, epoch)
                .with_context(|| format!("cannot derive the key of node {node_id}"))?;
            crate::output::stdout(&format!("{}\n", to_hex(&key.to_bytes())))?;
            // The key alone does not say its epoch, which `hb send` needs.
            tracing::info!(
                node_id,
                epoch,
                "the key of node {node_id} for epoch {epoch}: hb send --key-epoch {epoch}"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector_secret() -> [u8; 32] {
        std::array::from_fn(|i| i as u8)
    }

    const VECTOR_RING: &str = "[[epoch]]\nid = 1\nsecret = \"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"\n\n[[epoch]]\nid = 0\nsecret = \"000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F\"\n";

    #[test]
    fn protocol_vectors() {
        let s = vector_secret();
        assert_eq!(
            to_hex(&derive_node_key(&s, 42, 1)),
            "6df25b19dd0205345e893133518757d6"
        );
        assert_eq!(
            to_hex(&derive_node_key(&s, 1, 0)),
            "fd637554fc564d73044384760801da17"
        );
    }

    #[test]
    fn keyring_derives_the_vectors_and_the_newest_two_epochs() {
        let ring = Keyring::parse(Path::new("k.toml"), VECTOR_RING).unwrap();
        assert_eq!(ring.epochs(), vec![0, 1]);
        assert_eq!(ring.newest(), 1);
        let k = ring.node_key(42, 1).unwrap();
        assert_eq!(to_hex(&k.to_bytes()), "6df25b19dd0205345e893133518757d6");
        let k = ring.node_key(1, 0).unwrap();
        assert_eq!(to_hex(&k.to_bytes()), "fd637554fc564d73044384760801da17");
        let nk = ring.node_keys(42);
        assert_eq!((nk.slot, nk.epoch, nk.valid), (0, [1, 0], 0b11));
        assert_eq!(nk.find(1), Some(&ring.node_key(42, 1).unwrap()));
        assert_eq!(nk.find(0), Some(&ring.node_key(42, 0).unwrap()));
        assert_eq!(nk.find(2), None);
        let err = ring.node_key(42, 7).unwrap_err().to_string();
        assert_eq!(err, "keyring k.toml has no epoch 7 (it has 0, 1)");
    }

    #[test]
    fn three_epochs_keep_the_newest_two_and_one_keeps_one() {
        let text = "[[epoch]]\nid = 3\nsecret = \"".to_owned()
            + &"11".repeat(32)
            + "\"\n[[epoch]]\nid = 5\nsecret = \""
            + &"22".repeat(32)
            + "\"\n[[epoch]]\nid = 4\nsecret = \""
            + &"33".repeat(32)
            + "\"\n";
        let ring = Keyring::parse(Path::new("k"), &text).unwrap();
        assert_eq!(ring.node_keys(9).epoch, [5, 4]);
        let one = "[[epoch]]\nid = 2\nsecret = \"".to_owned() + &"44".repeat(32) + "\"\n";
        let nk = Keyring::parse(Path::new("k"), &one).unwrap().node_keys(9);
        assert_eq!((nk.epoch, nk.valid), ([2, 0], 0b01));
    }

    /// One row per way a keyring can be wrong: the message names the file
    /// and the problem and never contains the secret, wherever it was put
    /// (the rows from "secret as the epoch array" on are misplaced
    /// secrets: the parser's own message quoted several of them).
    #[test]
    fn bad_keyrings_are_named_and_secrets_never_shown() {
        let secret = "ab".repeat(32);
        let digits = "1234567890123";
        let (half1, half2) = secret.split_at(32);
        let cases: &[(&str, String, &str)] = &[
            ("empty file", String::new(), "has no [[epoch]] table"),
            (
                "bad TOML",
                format!("[[epoch]\nid = 1\nsecret = \"{secret}\"\n"),
                "is not valid TOML at line 1",
            ),
            (
                "bad TOML on the secret's line",
                format!("[[epoch]]\nid = 1\nsecret = \"{secret}\n"),
                "is not valid TOML at line 3",
            ),
            (
                "short secret",
                format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", &secret[..62]),
                "epoch 1: secret must be 64 hex digits (32 bytes), got 62 characters",
            ),
            (
                "not hex",
                format!("[[epoch]]\nid = 1\nsecret = \"{}zz\"\n", &secret[..62]),
                "epoch 1: secret must be hex digits only: character 63 is not one",
            ),
            (
                "duplicate epoch",
                format!(
                    "[[epoch]]\nid = 1\nsecret = \"{secret}\"\n[[epoch]]\nid = 1\nsecret = \"{secret}\"\n"
                ),
                "epoch 1 appears more than once",
            ),
            (
                "epoch out of range",
                format!("[[epoch]]\nid = 256\nsecret = \"{secret}\"\n"),
                "keyring /etc/hb/keyring.toml at line 2, column 6: epoch id 256 is out of range: ids are 0 to 255",
            ),
            (
                "negative epoch",
                format!(
                    "[[epoch]]\nid = 1\nsecret = \"{secret}\"\n[[epoch]]\nid = -1\nsecret = \"{secret}\"\n"
                ),
                "keyring /etc/hb/keyring.toml at line 5, column 6: epoch id -1 is out of range: ids are 0 to 255",
            ),
            (
                "unknown field",
                format!("[[epoch]]\nid = 1\nsecret = \"{secret}\"\nsecrt = 1\n"),
                "unknown field `secrt`",
            ),
            (
                "missing secret",
                "[[epoch]]\nid = 1\n".into(),
                "missing field `secret`",
            ),
            (
                "secret as the epoch array",
                format!("epoch = \"{secret}\"\n"),
                "at line 1, column 9: invalid type: string (not shown), expected a sequence",
            ),
            (
                "secret as an epoch entry",
                format!("epoch = [\"{secret}\"]\n"),
                "invalid type: string (not shown), expected struct EpochEntry",
            ),
            (
                "secret as the epoch id",
                format!("[[epoch]]\nid = \"{secret}\"\nsecret = \"{secret}\"\n"),
                "keyring /etc/hb/keyring.toml at line 2, column 6: invalid type: string (not shown), expected an epoch id (0 to 255)",
            ),
            (
                "secret as an integer",
                format!("[[epoch]]\nid = 1\nsecret = {digits}\n"),
                "at line 3, column 10: invalid type: integer (not shown), expected a string",
            ),
            (
                "secret as an integer too large",
                format!("[[epoch]]\nid = 1\nsecret = {}\n", "12".repeat(32)),
                "at line 3",
            ),
            (
                "secret as a key in an epoch",
                format!("[[epoch]]\nid = 1\n{secret} = 1\nsecret = \"{secret}\"\n"),
                "at line 3, column 1: unknown field (not shown), expected `id` or `secret`",
            ),
            (
                "secret as a quoted key",
                format!("[[epoch]]\nid = 1\n\"{secret}\" = 1\nsecret = \"{secret}\"\n"),
                "unknown field (not shown), expected `id` or `secret`",
            ),
            (
                "secret as a key at top level",
                format!("{secret} = \"{secret}\"\n"),
                "at line 1, column 1: unknown field (not shown), expected `epoch`",
            ),
            (
                "secret as a table name",
                format!("[{secret}]\n"),
                "unknown field (not shown), expected `epoch`",
            ),
            (
                "secret as an array-of-tables name",
                format!("[[{secret}]]\n"),
                "unknown field (not shown), expected `epoch`",
            ),
            (
                "bare secret at top level",
                format!("{secret}\n"),
                "at line 1",
            ),
            (
                "unquoted secret",
                format!("[[epoch]]\nid = 1\nsecret = {secret}\n"),
                "at line 3",
            ),
            (
                "invalid escape in the secret",
                format!("[[epoch]]\nid = 1\nsecret = \"\\q{secret}\"\n"),
                "at line 3",
            ),
            (
                "invalid unicode escape in the secret",
                format!("[[epoch]]\nid = 1\nsecret = \"{secret}\\u{{zz}}\"\n"),
                "at line 3",
            ),
            (
                "secret split across lines",
                format!("[[epoch]]\nid = 1\nsecret = \"{half1}\n{half2}\"\n"),
                "at line",
            ),
            (
                "secret split across a multi-line string",
                format!("[[epoch]]\nid = 1\nsecret = \"\"\"{half1}\n{half2}\"\"\"\n"),
                "epoch 1: secret must be 64 hex digits (32 bytes), got 65 characters",
            ),
            (
                "secret in a table",
                format!("[[epoch]]\nid = 1\n[epoch.secret]\n{secret} = 1\n"),
                "invalid type: map, expected a string",
            ),
            (
                "secret in an array",
                format!("[[epoch]]\nid = 1\nsecret = [\"{secret}\"]\n"),
                "invalid type: sequence, expected a string",
            ),
            (
                "text after the secret",
                format!("[[epoch]]\nid = 1\nsecret = \"{secret}\" {secret}\n"),
                "at line 3",
            ),
        ];
        for (what, text, want) in cases {
            let err = Keyring::parse(Path::new("/etc/hb/keyring.toml"), text)
                .map(|_| ())
                .expect_err(what)
                .to_string();
            assert!(
                err.starts_with("keyring /etc/hb/keyring.toml"),
                "{what}: {err}"
            );
            assert!(err.contains(want), "{what}: `{err}` lacks `{want}`");
            assert!(
                !err.contains("abab") && !err.contains("1212") && !err.contains("12345"),
                "{what}: secret leaked: {err}"
            );
            assert!(!err.contains('\n'), "{what}: not one line: {err}");
        }
    }

    #[test]
    fn held_epochs_equality_and_construction() {
        let s = |b: u8| Secret([b; SECRET_LEN]);
        let ring = Keyring::from_secrets("a.toml", [(2, s(2)), (7, s(7)), (5, s(5))]).unwrap();
        assert_eq!(ring.epochs(), vec![2, 5, 7]);
        assert_eq!(ring.held_epochs(), vec![7, 5]);
        // The cached derivers give the one derivation's keys.
        let nk = ring.node_keys(42);
        assert_eq!(nk.key[0], ring.node_key(42, 7).unwrap());
        assert_eq!(nk.key[1], ring.node_key(42, 5).unwrap());
        // Equal: same secrets under the same epochs, wherever from.
        let same = Keyring::from_secrets("b.toml", [(5, s(5)), (2, s(2)), (7, s(7))]).unwrap();
        assert_eq!(ring, same);
        let other = Keyring::from_secrets("a.toml", [(2, s(2)), (5, s(5)), (7, s(8))]).unwrap();
        assert_ne!(ring, other);
        let dbg = format!("{ring:?}");
        assert!(dbg.contains("[2, 5, 7]") && !dbg.contains("0707"), "{dbg}");
        let err = Keyring::from_secrets("c.toml", [(1, s(1)), (1, s(2))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "keyring c.toml: epoch 1 appears more than once"
        );
        let err = Keyring::from_secrets("c.toml", []).unwrap_err();
        assert_eq!(err.to_string(), "keyring c.toml has no [[epoch]] table");
    }

    /// Whatever a parser message quotes, only what cannot be secret
    /// material stays; a message that still holds a long token is
    /// withheld whole.
    #[test]
    fn redact_hides_what_could_be_a_secret() {
        let cases: &[(&str, &str)] = &[
            (
                "invalid type: string \"abab\", expected u8",
                "invalid type: string (not shown), expected u8",
            ),
            // An escaped quote does not end the string.
            (
                r#"invalid type: string "a\"b`c` d", expected u8"#,
                "invalid type: string (not shown), expected u8",
            ),
            (
                "invalid value: integer `256`, expected u8",
                "invalid value: integer `256`, expected u8",
            ),
            (
                "invalid type: integer `1234`, expected a string",
                "invalid type: integer (not shown), expected a string",
            ),
            (
                "unknown field `secrt`, expected `id` or `secret`",
                "unknown field `secrt`, expected `id` or `secret`",
            ),
            (
                "unknown field `this-is-far-too-long-to-show`, expected `epoch`",
                "unknown field (not shown), expected `epoch`",
            ),
            (
                "missing escaped value, expected `b`, `\\`, `\"`",
                "missing escaped value, expected `b`, `\\`, `\"`",
            ),
            ("unterminated `abab", "unterminated (not shown)"),
            ("unterminated \"ab\\\"", "unterminated (not shown)"),
            ("two\nlines ", "two lines"),
            ("a bare 0123456789abcdef", WITHHELD),
            ("a bare deadbeef", WITHHELD),
            ("a bare xyzxyzxyzxyzxyzxyz", WITHHELD),
        ];
        for (message, want) in cases {
            assert_eq!(redact(message), *want, "{message}");
        }
    }

    /// Epoch ids wrap after 255: newest and the held two follow serial
    /// order (RFC 1982), and a keyring that spans 128 ids or more is
    /// refused, its order being ambiguous.
    #[test]
    fn epochs_wrap_after_255() {
        assert!(is_newer(0, 255) && !is_newer(255, 0));
        assert!(is_newer(127, 0) && is_newer(0, 129));
        assert!(!is_newer(128, 0) && !is_newer(0, 128) && !is_newer(7, 7));
        let s = |b: u8| Secret([b; SECRET_LEN]);
        // (epochs in, oldest to newest, held newest first)
        let cases: &[(&[u8], &[u8], &[u8])] = &[
            (&[255, 0], &[255, 0], &[0, 255]),
            (&[0, 254, 255], &[254, 255, 0], &[0, 255]),
            (&[1, 0, 255], &[255, 0, 1], &[1, 0]),
            (&[0, 127], &[0, 127], &[127, 0]),
            (&[200, 71, 255, 0], &[200, 255, 0, 71], &[71, 0]),
            (&[129, 0], &[129, 0], &[0, 129]),
            (&[9], &[9], &[9]),
        ];
        for (ids, order, held) in cases {
            let ring = Keyring::from_secrets("k", ids.iter().map(|id| (*id, s(*id))))
                .unwrap_or_else(|e| panic!("{ids:?}: {e}"));
            assert_eq!(ring.epochs(), *order, "{ids:?}");
            assert_eq!(ring.held_epochs(), *held, "{ids:?}");
            assert_eq!(ring.newest(), held[0], "{ids:?}");
            let nk = ring.node_keys(42);
            assert_eq!(nk.epoch[0], held[0], "{ids:?}");
            assert_eq!(nk.key[0], ring.node_key(42, held[0]).unwrap(), "{ids:?}");
        }
        for ids in [
            &[0u8, 128][..],
            &[0, 64, 128],
            &[0, 100, 200],
            &[10, 138, 139],
        ] {
            let err = Keyring::from_secrets("k.toml", ids.iter().map(|id| (*id, s(*id))))
                .expect_err("ambiguous order");
            assert!(
                matches!(err, KeyringError::EpochsTooFarApart { .. }),
                "{ids:?}: {err}"
            );
        }
        let err = Keyring::from_secrets("k.toml", [(128, s(1)), (0, s(2))]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "keyring k.toml: epochs 0, 128 do not lie within 128 consecutive ids (after 255 comes 0), so which is newest is ambiguous; remove the old ones"
        );
        // The file form too: a rotation past 255 moves the sender's default.
        let text = format!(
            "[[epoch]]\nid = 255\nsecret = \"{}\"\n[[epoch]]\nid = 0\nsecret = \"{}\"\n",
            "11".repeat(32),
            "22".repeat(32)
        );
        let ring = Keyring::parse(Path::new("k"), &text).unwrap();
        assert_eq!((ring.newest(), ring.held_epochs()), (0, vec![0, 255]));
    }

    /// An ACL `r` entry for this process's own user (systemd's
    /// `LoadCredential=`: mode 0400, then 0440 with the entry) keeps a
    /// file private; one for another user, or group access, does not.
    #[test]
    fn an_acl_for_our_own_user_alone_is_private() {
        let acl = |user: u32, group_perm: u16| {
            let mut b = 2u32.to_le_bytes().to_vec();
            for (tag, perm, id) in [
                (0x01u16, 4u16, u32::MAX),
                (0x02, 4, user),
                (0x04, group_perm, u32::MAX),
                (0x10, 4, u32::MAX),
                (0x20, 0, u32::MAX),
            ] {
                b.extend(tag.to_le_bytes());
                b.extend(perm.to_le_bytes());
                b.extend(id.to_le_bytes());
            }
            b
        };
        // SAFETY: geteuid(2) cannot fail.
        let me = unsafe { libc::geteuid() };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.toml");
        let text = format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", "ab".repeat(32));
        for (what, blob, private) in [
            ("our user", acl(me, 0), true),
            ("another user", acl(me.wrapping_add(1), 0), false),
            ("our user and the group", acl(me, 4), false),
        ] {
            std::fs::write(&path, &text).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
            let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: valid NUL-terminated strings and a buffer of its length.
            let r = unsafe {
                libc::setxattr(
                    c.as_ptr(),
                    c"system.posix_acl_access".as_ptr(),
                    blob.as_ptr().cast(),
                    blob.len(),
                    0,
                )
            };
            assert_eq!(
                r,
                0,
                "{what}: setxattr: {}",
                std::io::Error::last_os_error()
            );
            let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_ne!(
                mode & 0o070,
                0,
                "{what}: the ACL shows as group bits ({mode:o})"
            );
            let r = Keyring::load(&path);
            assert_eq!(
                r.is_ok(),
                private,
                "{what}: {:?}",
                r.err().map(|e| e.to_string())
            );
            std::fs::remove_file(&path).unwrap();
        }
        assert!(!acl_grants_only(&[2, 0, 0, 0], me), "no entries");
        assert!(
            !acl_grants_only(&[1, 0, 0, 0, 1, 0, 4, 0, 0, 0, 0, 0], me),
            "version 1"
        );
    }

    /// A keyring is read up to a bound: `--keyring /dev/zero` is an error,
    /// not a monitor that eats the host's memory.
    #[test]
    fn an_endless_keyring_is_refused() {
        let err = Keyring::load("/dev/zero").unwrap_err();
        assert!(
            matches!(
                err,
                KeyringError::TooLarge {
                    max: KEYRING_MAX,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// A keyring its group or others may read is refused before it is
    /// read, with the fix; 0600 and 0400 load. Pipes are not checked.
    #[test]
    fn keyrings_open_to_others_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyring.toml");
        let text = format!("[[epoch]]\nid = 1\nsecret = \"{}\"\n", "ab".repeat(32));
        std::fs::write(&path, text).unwrap();
        let chmod = |mode: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        for mode in [0o644, 0o640, 0o604, 0o620, 0o610, 0o660, 0o601] {
            chmod(mode);
            let err = Keyring::load(&path).unwrap_err();
            let want_mode = mode & 0o7777;
            assert!(
                matches!(err, KeyringError::NotPrivate { mode: m, .. } if m == want_mode),
                "{mode:o}: {err}"
            );
            if mode == 0o644 {
                let p = path.display();
                assert_eq!(
                    err.to_string(),
                    format!(
                        "keyring {p} has mode 0644: users other than its owner may get at the master secrets; run `chmod 600 {p}`"
                    )
                );
            }
        }
        for mode in [0o600, 0o400] {
            chmod(mode);
            let ring = Keyring::load(&path).unwrap_or_else(|e| panic!("{mode:o}: {e}"));
            assert_eq!(ring.epochs(), vec![1]);
        }
        // Not a file at rest: a pipe's mode says nothing about the secret.
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
        let writer = {
            let fifo = fifo.clone();
            std::thread::spawn(move || {
                std::fs::write(
                    fifo,
                    "[[epoch]]\nid = 3\nsecret = \"".to_owned() + &"cd".repeat(32) + "\"\n",
                )
            })
        };
        assert_eq!(Keyring::load(&fifo).unwrap().epochs(), vec![3]);
        writer.join().unwrap().unwrap();
    }

    #[test]
    fn unreadable_keyring_names_the_file() {
        let err = Keyring::load("/nonexistent/hb/keyring.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("cannot read keyring /nonexistent/hb/keyring.toml:"),
            "{err}"
        );
    }

    #[test]
    fn hex_round_trip_and_errors() {
        let k: [u8; 16] = parse_hex("6DF25b19dd0205345e893133518757d6").unwrap();
        assert_eq!(to_hex(&k), "6df25b19dd0205345e893133518757d6");
        assert_eq!(
            parse_hex::<16>("abc"),
            Err(HexError::Length { want: 32, got: 3 })
        );
        assert_eq!(parse_hex::<2>("0g00"), Err(HexError::NotHex { at: 2 }));
        // Multi-byte characters: a length error, never a panic.
        assert!(parse_hex::<2>("ééé").is_err());
        assert!(parse_hex::<3>("ééé").is_err());
    }

    #[test]
    fn new_secrets_differ() {
        assert_ne!(new_secret().unwrap(), new_secret().unwrap());
        assert_eq!(format!("{:?}", new_secret().unwrap()), "Secret(<redacted>)");
    }

    #[test]
    fn node_id_zero_is_refused() {
        assert!(parse_node_id("0").unwrap_err().contains("reserved"));
        assert_eq!(parse_node_id("42"), Ok(42));
        assert!(parse_node_id("-1").is_err());
        assert!(parse_node_id("4294967296").is_err());
    }

    /// Property tests of the keyring file, which operators write by hand:
    /// any text is a keyring or an error that names the file, never a
    /// panic, and never shows a secret (any 16 hex digits of one).
    mod props {
        use proptest::prelude::*;

        use super::*;

        const SECRET: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

        /// TOML-ish text built from a keyring's own pieces (so the parser
        /// gets past its first character), with stray bytes between.
        fn keyringish() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                Just("[[epoch]]\n".to_owned()),
                Just("[epoch]\n".to_owned()),
                Just("id = ".to_owned()),
                Just("secret = ".to_owned()),
                Just(format!("\"{SECRET}\"")),
                Just(format!("'{SECRET}'")),
                Just(format!("\"\"\"{SECRET}")),
                Just(SECRET[..40].to_owned()),
                Just("\n".to_owned()),
                Just("\"".to_owned()),
                "-?[0-9]{1,22}",
                "[ -~]{0,6}",
                "[\u{80}-\u{10ffff}]{1,3}",
                any::<char>().prop_map(String::from),
            ];
            prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
        }

        fn check(text: &str) -> Result<(), TestCaseError> {
            match Keyring::parse(Path::new("k.toml"), text) {
                Ok(ring) => {
                    let epochs = ring.epochs();
                    prop_assert!(!epochs.is_empty() && ring.held_epochs().len() <= 2);
                    prop_assert_eq!(ring.newest(), *epochs.last().unwrap());
                }
                Err(e) => {
                    let msg = format!("{e:#} {e:?}").to_ascii_lowercase();
                    prop_assert!(msg.contains("k.toml"), "{}", msg);
                    for w in SECRET.as_bytes().windows(16) {
                        let w = std::str::from_utf8(w).unwrap();
                        prop_assert!(!msg.contains(w), "secret shown: {}", msg);
                    }
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_text_is_a_keyring_or_a_named_error_without_the_secret(
                text in prop_oneof![keyringish(), any::<String>()],
            ) {
                check(&text)?;
            }
        }

        /// A keyring cut short anywhere (a copy interrupted, a full disk).
        #[test]
        fn every_truncation_of_a_keyring_parses_or_is_refused() {
            let text = format!(
                "[[epoch]]\nid = 7\nsecret = \"{SECRET}\"\n\n[[epoch]]\nid = 8\nsecret = \"{}\"\n",
                SECRET.to_uppercase()
            );
            for (i, _) in text.char_indices() {
                check(&text[..i]).unwrap();
            }
        }
    }
}
