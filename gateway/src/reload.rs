//! Reload without restart: SIGHUP or `POST /v1/reload` reads the
//! configuration again from where it came from at start (file, environment,
//! flags) and applies what may change while the gateway runs: allow-lists
//! (agents, limited relay peers, trusted balancers), join tokens, bans and rates, per-port and per-source caps, the idle
//! timeout, the PROXY policy, port ranges and bandwidth caps. No connection
//! is dropped: new values apply to what comes next (bandwidth caps at once).
//! A change to any other key is refused by name, and then nothing changes.

use std::sync::Arc;

use relaygate_common::names::Secret;
use serde::Serialize;
use serde_json::Value;

use crate::{
    admission::Admission,
    caps::Caps,
    config::{store::StoreKind, GatewayConfig},
    guard::Guard,
    listener::{DataPlane, PlaneSettings},
    metrics::Metrics,
};

/// Reads the configuration again, as the gateway was started.
pub type Source = Arc<dyn Fn() -> anyhow::Result<GatewayConfig> + Send + Sync>;

/// Keys (and sections, ending in `.`) a reload applies.
pub const RELOADABLE: &[&str] = &[
    "admission.allow",
    "admission.tokens",
    "admission.token",
    "admission.token_file",
    "admission.accept_tokens",
    "guard.blacklist",
    "guard.connections_per_ip",
    "guard.tunnel_connections_per_ip",
    "guard.reservations_per_peer",
    "guard.circuits_per_peer",
    "guard.circuits_per_ip",
    "guard.violations_before_ban",
    "guard.violation_window",
    "guard.ban_duration",
    "guard.peer_bans_before_source_ban",
    "limits.max_connections_per_tunnel",
    "limits.max_connections_per_source",
    "limits.idle_timeout",
    "leases.port_range",
    "leases.allowed_ports",
    "leases.max_tunnels_per_agent",
    "leases.expire_after",
    "proxy_protocol.",
    "relay.limited_peers",
    "bandwidth.",
];

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("cannot read the configuration: {0}; the running one stays")]
    Load(String),
    #[error("{} cannot change while the gateway runs (restart it to apply); nothing was changed", .0.join(", "))]
    Fixed(Vec<String>),
}

/// What a reload did.
#[derive(Debug, Serialize)]
pub struct Reloaded {
    /// The keys whose values changed, dotted.
    pub changed: Vec<String>,
}

pub struct Reloader {
    source: Source,
    running: tokio::sync::Mutex<GatewayConfig>,
    /// Where the main join token came from at start, for a fleet (etcd
    /// holds it; a reload keeps it).
    fleet_token: Option<Secret>,
    pub admission: Arc<Admission>,
    pub guard: Arc<Guard>,
    pub dataplane: Arc<DataPlane>,
    pub caps: Arc<Caps>,
    pub leases: Arc<crate::lease::Leases>,
    pub hop: Arc<crate::hop::Hop>,
    /// Closes what is open from peers a reloaded ban list names.
    pub disconnect: crate::host::HostHandle,
    pub metrics: Arc<Metrics>,
}

impl Reloader {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        source: Source,
        running: GatewayConfig,
        fleet_token: Option<Secret>,
        admission: Arc<Admission>,
        guard: Arc<Guard>,
        dataplane: Arc<DataPlane>,
        caps: Arc<Caps>,
        leases: Arc<crate::lease::Leases>,
        hop: Arc<crate::hop::Hop>,
        disconnect: crate::host::HostHandle,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            source,
            running: tokio::sync::Mutex::new(running),
            fleet_token,
            admission,
            guard,
            dataplane,
            caps,
            leases,
            hop,
            disconnect,
            metrics,
        })
    }

    /// Reads the configuration again and applies it, or refuses it whole.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        // One reload at a time, from reading the file to the last change.
        let mut running = self.running.lock().await;
        let result = self.reload_locked(&mut running).await;
        let outcome = match &result {
            Ok(r) => {
                tracing::info!(changed = %r.changed.join(","), "configuration reloaded");
                "applied"
            }
            Err(e) => {
                tracing::warn!(error = %e, "configuration reload refused");
                match e {
                    ReloadError::Load(_) => "unreadable",
                    ReloadError::Fixed(_) => "refused",
                }
            }
        };
        self.metrics
            .reloads
            .get_or_create(&relaygate_common::metrics::ReasonLabels::new(outcome))
            .inc();
        result
    }

    async fn reload_locked(&self, running: &mut GatewayConfig) -> Result<Reloaded, ReloadError> {
        let source = self.source.clone();
        let new = tokio::task::spawn_blocking(move || source())
            .await
            .map_err(|e| ReloadError::Load(e.to_string()))?
            .map_err(|e| ReloadError::Load(redact(&format!("{e:#}"))))?;
        new.validate()
            .map_err(|e| ReloadError::Load(redact(&e.to_string())))?;
        let changed = changed_keys(running, &new);
        let fixed: Vec<String> = changed.iter().filter(|k| !reloadable(k)).cloned().collect();
        if !fixed.is_empty() {
            return Err(ReloadError::Fixed(fixed));
        }
        // The token file is read (never created) off the runtime.
        let main = {
            let (cfg, fleet) = (new.clone(), self.fleet_token.clone());
            tokio::task::spawn_blocking(move || main_token(&cfg, fleet))
                .await
                .map_err(|e| ReloadError::Load(e.to_string()))??
        };
        self.admission.reload(
            new.admission.allow.iter().copied(),
            crate::app::accepted_tokens(&new, main.as_ref()),
        );
        let banned = self.guard.reload(new.guard.clone());
        self.dataplane.settings.store(Arc::new(PlaneSettings {
            proxy: new.proxy_protocol.clone(),
            max_per_tunnel: new.limits.max_connections_per_tunnel,
            idle_timeout: new.limits.idle_timeout,
        }));
        self.dataplane
            .sources
            .set_share(new.limits.max_connections_per_source);
        self.caps.reload(new.bandwidth.clone());
        self.leases.set_policy(crate::app::port_policy(&new));
        self.hop
            .limited
            .store(Arc::new(new.relay.limited_peers.iter().copied().collect()));
        *running = new;
        // As a ban from the admin API: what is open from a newly banned peer closes.
        if !banned.is_empty() {
            self.disconnect.close_banned(&banned).await;
        }
        Ok(Reloaded { changed })
    }
}

/// The main join token a configuration names: in a fleet without an inline
/// token, the one etcd held at start (`fleet`); else the inline one, or the
/// token file's, read as it is now. A reload never creates a token: a
/// missing file is an error, not a new token nobody was given.
fn main_token(cfg: &GatewayConfig, fleet: Option<Secret>) -> Result<Option<Secret>, ReloadError> {
    if !cfg.admission.tokens {
        return Ok(None);
    }
    if !cfg.admission.token.is_empty() {
        return Ok(Some(cfg.admission.token.clone()));
    }
    if cfg.store.kind == StoreKind::Etcd {
        return Ok(fleet);
    }
    let path = cfg.token_file();
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(Secret::new(t.trim()))),
        Ok(_) => Err(ReloadError::Load(format!(
            "join token file {} is empty; restore it or set admission.token",
            path.display()
        ))),
        Err(e) => Err(ReloadError::Load(format!(
            "cannot read join token file {}: {e}; restore it or set admission.token (a reload does not create a token)",
            path.display()
        ))),
    }
}

/// Keys holding secrets: their values never appear in an answer or a log.
const SECRET_KEYS: &[&str] = &[
    "admission.token",
    "admission.accept_tokens",
    "admin.token",
    "identity.key",
];

/// An error about a secret key loses its quoted values: a configuration
/// parser quotes what it could not take, and that may be a token.
fn redact(msg: &str) -> String {
    if !SECRET_KEYS.iter().any(|k| msg.contains(k)) {
        return msg.to_string();
    }
    let mut out = String::with_capacity(msg.len());
    let mut quoted = false;
    for c in msg.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"<redacted>");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// Each secret's value, by key, for comparing two configurations (they
/// serialize masked).
fn secrets(c: &GatewayConfig) -> [(&'static str, Vec<&str>); 4] {
    [
        ("admission.token", vec![c.admission.token.expose()]),
        (
            "admission.accept_tokens",
            c.admission
                .accept_tokens
                .iter()
                .map(|t| t.expose())
                .collect(),
        ),
        ("admin.token", vec![c.admin.token.expose()]),
        ("identity.key", vec![c.identity.key.expose()]),
    ]
}

fn reloadable(key: &str) -> bool {
    RELOADABLE.iter().any(|r| match r.strip_suffix('.') {
        Some(section) => key == section || key.starts_with(r),
        None => key == *r,
    })
}

/// The dotted keys whose values differ between two configurations (a list
/// or a map that differs is one key).
pub fn changed_keys(old: &GatewayConfig, new: &GatewayConfig) -> Vec<String> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(old), serde_json::to_value(new)) else {
        return vec!["<configuration>".into()];
    };
    let mut out = Vec::new();
    diff("", &a, &b, &mut out);
    for ((key, x), (_, y)) in secrets(old).into_iter().zip(secrets(new)) {
        if x != y {
            out.push(key.to_string());
        }
    }
    out.sort();
    out.dedup();
    out
}

fn diff(prefix: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (x.get(k), y.get(k)) {
                    (Some(v), Some(w)) => diff(&key, v, w, out),
                    _ => out.push(key),
                }
            }
        }
        _ if a != b => out.push(prefix.to_string()),
        _ => {}
    }
}

/// Reloads on every SIGHUP until the process ends.
pub async fn on_sighup(reloader: Arc<Reloader>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP; reload through POST /v1/reload");
            return;
        }
    };
    while hup.recv().await.is_some() {
        let _ = reloader.reload().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_keys_name_what_changed_and_which_may() {
        let a = GatewayConfig::default();
        let mut b = a.clone();
        b.limits.idle_timeout = std::time::Duration::from_secs(5);
        b.leases.max_tunnels_per_agent = 3;
        b.bandwidth.tunnel.inbound = 1000;
        let mut keys = changed_keys(&a, &b);
        keys.sort();
        assert_eq!(
            keys,
            vec![
                "bandwidth.tunnel.inbound",
                "leases.max_tunnels_per_agent",
                "limits.idle_timeout"
            ]
        );
        assert!(keys.iter().all(|k| reloadable(k)));
        b.listen.clear();
        b.guard.ipv6_prefix = crate::config::guard::Ipv6Prefix::DEFAULT;
        let keys = changed_keys(&a, &b);
        assert!(keys.contains(&"listen".to_string()));
        assert!(!reloadable("listen"));
        assert!(!reloadable("guard.ipv6_prefix"));
        assert!(!reloadable("limits.max_connections"));
        assert!(reloadable("proxy_protocol.trusted"));
        // Secrets serialize masked, yet a change of one is seen, by name only.
        let mut c = a.clone();
        c.admin.token = relaygate_common::names::Secret::new("rotated-admin-token");
        c.admission.token = relaygate_common::names::Secret::new("rgt_new");
        let keys = changed_keys(&a, &c);
        assert_eq!(keys, vec!["admin.token", "admission.token"]);
        assert!(!reloadable("admin.token") && reloadable("admission.token"));
        let msg = redact("invalid type: string \"rgt_secret\", expected a sequence for key `admission.accept_tokens`");
        assert!(
            !msg.contains("rgt_secret") && msg.contains("admission.accept_tokens"),
            "{msg}"
        );
        assert_eq!(
            redact("bad \"x\" for key `listen`"),
            "bad \"x\" for key `listen`"
        );
    }
}
