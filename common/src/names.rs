//! Typed values that cross the wire or the config: a tunnel's name, a leased
//! port, a port range and the join token. Parsing validates once, so the rest
//! of the code never re-checks a string.

use std::{fmt, num::NonZeroU16, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use subtle::ConstantTimeEq;

/// Longest tunnel name accepted; it is carried in a one-byte length field.
pub const MAX_TUNNEL_NAME: usize = 63;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("tunnel name must be 1 to {MAX_TUNNEL_NAME} characters of [A-Za-z0-9._-], got {0:?}")]
    TunnelName(String),
    #[error("service name must be 1 to {MAX_TUNNEL_NAME} characters of [A-Za-z0-9._-], got {0:?}")]
    ServiceName(String),
    #[error("port must be 1-65535, got {0:?}")]
    Port(String),
    #[error("port range must look like 20000-20999 or 9905 (low <= high), got {0:?}")]
    Range(String),
}

/// Name of a tunnel, unique per agent. `[A-Za-z0-9._-]{1,63}`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TunnelName(String);

impl TunnelName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for TunnelName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if valid_name(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::TunnelName(s.to_owned()))
        }
    }
}

impl fmt::Display for TunnelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_TUNNEL_NAME
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Name of a service an agent offers to peers (`ssh`), same rules as a tunnel name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(String);

impl ServiceName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ServiceName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if valid_name(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(NameError::ServiceName(s.to_owned()))
        }
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A public TCP port leased to one tunnel of one agent. Never zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeasePort(NonZeroU16);

impl LeasePort {
    pub const MIN: LeasePort = LeasePort(NonZeroU16::MIN);
    pub fn new(port: u16) -> Option<Self> {
        NonZeroU16::new(port).map(Self)
    }
    pub fn get(self) -> u16 {
        self.0.get()
    }
}

impl FromStr for LeasePort {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.trim()
            .parse::<u16>()
            .ok()
            .and_then(LeasePort::new)
            .ok_or_else(|| NameError::Port(s.to_owned()))
    }
}

impl fmt::Display for LeasePort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An inclusive range of ports, written `low-high` or a single `port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub low: LeasePort,
    pub high: LeasePort,
}

impl PortRange {
    pub fn contains(&self, port: LeasePort) -> bool {
        self.low <= port && port <= self.high
    }
    pub fn iter(&self) -> impl Iterator<Item = LeasePort> {
        (self.low.get()..=self.high.get()).filter_map(LeasePort::new)
    }
    pub fn len(&self) -> usize {
        usize::from(self.high.get() - self.low.get()) + 1
    }
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || NameError::Range(s.to_owned());
        let (low, high) = match s.split_once('-') {
            Some((l, h)) => (l.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?),
            None => {
                let p: LeasePort = s.parse().map_err(|_| bad())?;
                (p, p)
            }
        };
        if low > high {
            return Err(bad());
        }
        Ok(Self { low, high })
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.low == self.high {
            write!(f, "{}", self.low)
        } else {
            write!(f, "{}-{}", self.low, self.high)
        }
    }
}

/// A secret string: deserialises from plain text, never prints or serialises it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Constant-time comparison, so response timing says nothing about the secret.
    pub fn matches(&self, other: &str) -> bool {
        !self.0.is_empty() && self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// How a secret appears in printed config.
pub const MASK: &str = "***";

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { MASK })
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Self(String::deserialize(d)?.trim().to_owned()))
    }
}

/// Implements serde through `FromStr`/`Display` (typed values in config and
/// JSON). Exported for the binaries' own typed values; callers need `serde`
/// and `serde_json` as dependencies.
#[macro_export]
macro_rules! serde_via_str {
    ($($t:ty),*) => {$(
        impl ::serde::Serialize for $t {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> ::serde::Deserialize<'de> for $t {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Accept numbers too: env vars and TOML may give a port as an integer.
                let v = <::serde_json::Value as ::serde::Deserialize>::deserialize(d)?;
                let s = match v {
                    ::serde_json::Value::String(s) => s,
                    ::serde_json::Value::Number(n) => n.to_string(),
                    other => return Err(<D::Error as ::serde::de::Error>::custom(format!("expected a string, got {other}"))),
                };
                s.parse().map_err(<D::Error as ::serde::de::Error>::custom)
            }
        }
    )*};
}
serde_via_str!(TunnelName, ServiceName, LeasePort, PortRange);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnel_names() {
        assert!("node".parse::<TunnelName>().is_ok());
        assert!("a.b_c-9".parse::<TunnelName>().is_ok());
        assert!("".parse::<TunnelName>().is_err());
        assert!("has space".parse::<TunnelName>().is_err());
        assert!("x".repeat(64).parse::<TunnelName>().is_err());
        assert!("x".repeat(63).parse::<TunnelName>().is_ok());
    }

    #[test]
    fn ports_and_ranges() {
        assert!("0".parse::<LeasePort>().is_err());
        assert!("65536".parse::<LeasePort>().is_err());
        let r: PortRange = "20000-20002".parse().unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(
            r.iter().map(|p| p.get()).collect::<Vec<_>>(),
            [20000, 20001, 20002]
        );
        assert!("9-8".parse::<PortRange>().is_err());
        let single: PortRange = "9905".parse().unwrap();
        assert!(single.contains(LeasePort::new(9905).unwrap()));
        assert_eq!(single.to_string(), "9905");
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "Secret(***)");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"***\"");
        assert!(s.matches("hunter2"));
        assert!(!s.matches("hunter3"));
        assert!(!Secret::default().matches(""));
    }
}
