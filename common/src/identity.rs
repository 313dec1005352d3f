//! libp2p identity keys.
//!
//! A key file is created on first start with mode 0600 and holds the libp2p
//! protobuf encoding. A key can also be supplied as text: hex of the protobuf
//! encoding, or hex of the 64 raw Ed25519 bytes (seed || public key) that
//! go-libp2p and Teranode's `p2p_private_key` use, or hex of a 32-byte seed.

use std::{fs, io::Write, os::unix::fs::PermissionsExt, path::Path};

use libp2p::identity::{ed25519, Keypair};
use serde::{Deserialize, Serialize};

use crate::names::Secret;

/// `[identity]` of both binaries' configs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentityConfig {
    /// Key file; created with mode 0600 when missing. Default: `<data_dir>/identity.key`.
    pub key_file: Option<std::path::PathBuf>,
    /// The key inline (hex of the protobuf encoding or of 64 raw Ed25519 bytes); wins over `key_file`.
    pub key: Secret,
}

impl IdentityConfig {
    /// The inline key, or the key file (default `<data_dir>/identity.key`), created if missing.
    pub fn load(&self, data_dir: &Path) -> Result<(Keypair, KeySource), IdentityError> {
        if !self.key.is_empty() {
            return Ok((parse_key(self.key.expose().as_bytes())?, KeySource::Inline));
        }
        ensure_private_dir(data_dir)?;
        load_or_create(
            &self
                .key_file
                .clone()
                .unwrap_or_else(|| data_dir.join("identity.key")),
        )
    }
}

/// Creates `dir` (and parents) owner-only: it holds keys and tokens. An
/// existing dir (e.g. a mounted volume we may not chmod) is only warned about.
pub fn ensure_private_dir(dir: &Path) -> Result<(), IdentityError> {
    let werr = |source| IdentityError::Write {
        path: dir.display().to_string(),
        source,
    };
    if dir.is_dir() {
        let mode = fs::metadata(dir).map_err(werr)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 && fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).is_err()
        {
            tracing::warn!(
                dir = %dir.display(),
                mode = format!("{mode:o}"),
                "data dir is readable by others and cannot be restricted; the key files in it are still 0600"
            );
        }
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(werr)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(werr)
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "cannot write key file {path}: {source} (check that the data dir exists and is writable)"
    )]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is not a valid key: expected the libp2p protobuf encoding, or hex of it, or hex of 64 raw Ed25519 bytes (seed||public key), or hex of a 32-byte Ed25519 seed")]
    Invalid(String),
}

/// What was done to get the key, for the start-up log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Created,
    Loaded,
    Inline,
}

/// Loads the key at `path`, creating a fresh Ed25519 key (mode 0600) if it does not exist.
pub fn load_or_create(path: &Path) -> Result<(Keypair, KeySource), IdentityError> {
    match fs::read(path) {
        Ok(bytes) => {
            warn_if_readable_by_others(path);
            let key = parse_key(&bytes)
                .map_err(|_| IdentityError::Invalid(path.display().to_string()))?;
            Ok((key, KeySource::Loaded))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            if write_key(path, &key)? {
                Ok((key, KeySource::Created))
            } else {
                // Another process created it first: its key is the identity.
                load_or_create(path)
            }
        }
        Err(source) => Err(IdentityError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// Parses a key given in any of the accepted encodings.
pub fn parse_key(bytes: &[u8]) -> Result<Keypair, IdentityError> {
    if let Ok(k) = Keypair::from_protobuf_encoding(bytes) {
        return Ok(k);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| IdentityError::Invalid("key bytes".into()))?
        .trim();
    let text = text.strip_prefix("0x").unwrap_or(text);
    let raw = hex::decode(text).map_err(|_| IdentityError::Invalid("key text".into()))?;
    if let Ok(k) = Keypair::from_protobuf_encoding(&raw) {
        return Ok(k);
    }
    let invalid = || IdentityError::Invalid("key text".into());
    match raw.len() {
        64 => {
            let mut raw = raw;
            let kp = ed25519::Keypair::try_from_bytes(&mut raw).map_err(|_| invalid())?;
            Ok(kp.into())
        }
        32 => {
            let sk = ed25519::SecretKey::try_from_bytes(raw).map_err(|_| invalid())?;
            Ok(ed25519::Keypair::from(sk).into())
        }
        _ => Err(invalid()),
    }
}

/// Writes `key` to `path` with mode 0600, atomically, unless a key is there
/// already: true if this call created it, false if another process got there
/// first (two processes starting on one data dir). The key goes to a
/// uniquely named temporary file (0600) in the same directory, is synced,
/// then linked into place only if the name is free, and the directory is
/// synced so the new name survives a crash.
pub fn write_key(path: &Path, key: &Keypair) -> Result<bool, IdentityError> {
    let werr = |source| IdentityError::Write {
        path: path.display().to_string(),
        source,
    };
    let bytes = key
        .to_protobuf_encoding()
        .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(werr)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(".identity-")
        .permissions(fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(werr)?;
    tmp.write_all(&bytes).map_err(werr)?;
    tmp.as_file().sync_all().map_err(werr)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => {}
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(werr(e.error)),
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(werr)?;
    Ok(true)
}

fn warn_if_readable_by_others(path: &Path) {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = format!("{mode:o}"),
                "key file is readable by group or others; run chmod 600 on it"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_0600_and_reloads_same_identity() {
        let dir = std::env::temp_dir().join(format!("rg-id-{}", std::process::id()));
        let path = dir.join("identity.key");
        let _ = fs::remove_dir_all(&dir);
        let (a, src) = load_or_create(&path).unwrap();
        assert_eq!(src, KeySource::Created);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, src) = load_or_create(&path).unwrap();
        assert_eq!(src, KeySource::Loaded);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn processes_creating_one_key_at_once_agree_on_it() {
        // Seen on ecf9cf7: `relaygate-gateway peer-id` run while the gateway
        // started made it exit with "cannot write key file": both wrote one
        // fixed `<key>.tmp`. Now one creates it and the others load it.
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir
                .path()
                .join(format!("keys-{round}"))
                .join("identity.key");
            let ids: Vec<_> = (0..8)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        load_or_create(&path).map(|(k, s)| (k.public().to_peer_id(), s))
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap().expect("every process gets a key"))
                .collect();
            assert!(
                ids.iter().all(|(id, _)| *id == ids[0].0),
                "one identity: {ids:?}"
            );
            let created = ids.iter().filter(|(_, s)| *s == KeySource::Created).count();
            assert_eq!(created, 1, "one creator");
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            let leftovers = fs::read_dir(path.parent().unwrap()).unwrap().count();
            assert_eq!(leftovers, 1, "no temporary files left");
        }
    }

    #[test]
    fn accepts_go_libp2p_hex_and_protobuf_hex() {
        let key = ed25519::Keypair::generate();
        let raw = key.to_bytes(); // 64 bytes: seed || public
        let expect = Keypair::from(key.clone()).public().to_peer_id();
        let k = parse_key(hex::encode(raw).as_bytes()).unwrap();
        assert_eq!(k.public().to_peer_id(), expect);
        let pb = Keypair::from(key).to_protobuf_encoding().unwrap();
        let k = parse_key(format!("{}\n", hex::encode(&pb)).as_bytes()).unwrap();
        assert_eq!(k.public().to_peer_id(), expect);
        let k = parse_key(&pb).unwrap();
        assert_eq!(k.public().to_peer_id(), expect);
        let seed = &raw[..32];
        let k = parse_key(hex::encode(seed).as_bytes()).unwrap();
        assert_eq!(k.public().to_peer_id(), expect);
    }

    #[test]
    fn rejects_garbage_keys() {
        assert!(parse_key(b"not a key").is_err());
        assert!(parse_key(b"abcd").is_err());
        assert!(parse_key(&[0xff; 10]).is_err());
    }
}
