//! Who may open a session: peers on the allow-list, or agents presenting a
//! join token (the main one, or one of `admission.accept_tokens` while a
//! token is rotated). The token is generated on first start and never
//! logged. A configuration reload replaces both lists at once.

use std::{
    collections::HashSet,
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::Path,
    sync::{PoisonError, RwLock},
};

use libp2p::PeerId;
use rand::Rng;
use relaygate_common::names::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    AllowList,
    Token,
}

impl Admitted {
    pub fn as_str(self) -> &'static str {
        match self {
            Admitted::AllowList => "allow_list",
            Admitted::Token => "join_token",
        }
    }
}

pub struct Admission {
    inner: RwLock<Inner>,
}

struct Inner {
    allow: HashSet<PeerId>,
    tokens: Vec<Secret>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read join token {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write join token {path}: {source} (check that the data dir is writable)")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("join token file {0} is empty; delete it to generate a new token")]
    Empty(String),
}

impl Admission {
    /// `tokens`: every join token accepted; empty when tokens are off.
    pub fn new(allow: impl IntoIterator<Item = PeerId>, tokens: Vec<Secret>) -> Self {
        Self {
            inner: RwLock::new(Inner {
                allow: allow.into_iter().collect(),
                tokens: tokens.into_iter().filter(|t| !t.is_empty()).collect(),
            }),
        }
    }

    /// Replaces the allow-list and the accepted tokens (a reload): sessions
    /// already admitted stay.
    pub fn reload(&self, allow: impl IntoIterator<Item = PeerId>, tokens: Vec<Secret>) {
        let fresh = Self::new(allow, tokens);
        let inner = fresh
            .inner
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner);
        *self.inner.write().unwrap_or_else(PoisonError::into_inner) = inner;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `peer` is on the allow-list (the relay treats it as a member).
    pub fn allows(&self, peer: &PeerId) -> bool {
        self.read().allow.contains(peer)
    }

    pub fn check(&self, peer: &PeerId, token: Option<&str>) -> Option<Admitted> {
        let inner = self.read();
        if inner.allow.contains(peer) {
            return Some(Admitted::AllowList);
        }
        let theirs = token?;
        inner
            .tokens
            .iter()
            .any(|ours| ours.matches(theirs))
            .then_some(Admitted::Token)
    }
}

/// Loads the join token, generating one (mode 0600) if the file does not exist.
/// Returns the token and whether it was just created.
pub fn load_or_create_token(path: &Path) -> Result<(Secret, bool), TokenError> {
    match fs::read_to_string(path) {
        Ok(s) if s.trim().is_empty() => Err(TokenError::Empty(path.display().to_string())),
        Ok(s) => Ok((Secret::new(s.trim()), false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let bytes: [u8; 24] = rand::rng().random();
            let token = format!("rgt_{}", hex::encode(bytes));
            let werr = |source| TokenError::Write {
                path: path.display().to_string(),
                source,
            };
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(werr)?;
            f.write_all(format!("{token}\n").as_bytes()).map_err(werr)?;
            f.sync_all().map_err(werr)?;
            Ok((Secret::new(token), true))
        }
        Err(source) => Err(TokenError::Read {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allow_list_or_token() {
        let (a, b) = (PeerId::random(), PeerId::random());
        let adm = Admission::new([a], vec![Secret::new("rgt_x")]);
        assert_eq!(adm.check(&a, None), Some(Admitted::AllowList));
        assert_eq!(adm.check(&b, Some("rgt_x")), Some(Admitted::Token));
        assert_eq!(adm.check(&b, Some("rgt_y")), None);
        assert_eq!(adm.check(&b, None), None);
        let no_tokens = Admission::new([], Vec::new());
        assert_eq!(no_tokens.check(&b, Some("")), None);
        // Rotation: the old token and the new one, then only the new one.
        adm.reload([], vec![Secret::new("rgt_new"), Secret::new("rgt_x")]);
        assert_eq!(adm.check(&b, Some("rgt_x")), Some(Admitted::Token));
        assert_eq!(adm.check(&b, Some("rgt_new")), Some(Admitted::Token));
        assert_eq!(adm.check(&a, None), None, "off the allow-list");
        adm.reload([a], vec![Secret::new("rgt_new")]);
        assert_eq!(adm.check(&b, Some("rgt_x")), None);
        assert!(adm.allows(&a));
    }
}
