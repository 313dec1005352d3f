//! `[store]`: where leases are kept. `embedded` (the default) is a redb file
//! in the data dir, for one gateway; `etcd` is shared by every gateway of a
//! fleet pointed at the same endpoints and prefix.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    pub kind: StoreKind,
    pub etcd: EtcdConfig,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Embedded,
    Etcd,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// `host:port` or `http(s)://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// Every key this fleet writes starts with it, so several fleets can
    /// share one etcd.
    pub prefix: String,
    /// CA certificate (PEM) that signs the members' certificates; with it
    /// the connection is TLS.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), when etcd asks for them.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// User for etcd's authentication, with its password read from
    /// `password_file` (never from the command line).
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// How long one request may take before the store counts as unavailable.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// A gateway's record in the fleet lives this long without a refresh
    /// (refreshed every third of it): how soon a dead gateway leaves the
    /// fleet's view.
    #[serde(with = "humantime_serde")]
    pub member_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            prefix: "/relaygate/".into(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            timeout: Duration::from_secs(3),
            member_ttl: Duration::from_secs(5),
        }
    }
}
