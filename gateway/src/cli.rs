//! Command line of `relaygate-gateway`. Flags override the config file and
//! `RELAYGATE_*` environment; `--set key=value` reaches every config key.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use relaygate_common::config::{self, CommonOpts, Overrides};

use crate::{app, config::GatewayConfig};

#[derive(Parser, Debug)]
#[command(
    name = "relaygate-gateway",
    version,
    about = "Gives P2P nodes behind NAT a stable public address: leased public ports tunnelled to agents",
    after_help = "Every config key can also be set as RELAYGATE_<SECTION>__<KEY> (e.g. RELAYGATE_ADMIN__LISTEN) or with --set section.key=value. See README.md for all keys."
)]
pub struct Cli {
    #[command(flatten)]
    pub opts: Opts,
    #[command(subcommand)]
    pub command: Option<Cmd>,
}

#[derive(Args, Debug, Default)]
pub struct Opts {
    #[command(flatten)]
    pub common: CommonOpts,
    /// libp2p listen multiaddr, repeatable [listen].
    #[arg(long, global = true, value_name = "MULTIADDR")]
    pub listen: Vec<String>,
    /// Advertised multiaddr (DNS names allowed), repeatable [advertise].
    #[arg(long, global = true, value_name = "MULTIADDR")]
    pub advertise: Vec<String>,
    /// Agent peer id admitted without a token, repeatable [admission.allow].
    #[arg(long, global = true, value_name = "PEER_ID")]
    pub allow_peer: Vec<String>,
    /// Ports leased automatically, e.g. 20000-20999 [leases.port_range].
    #[arg(long, global = true, value_name = "LOW-HIGH")]
    pub port_range: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the gateway (the default).
    Run,
    /// Check the configuration and print the effective one, secrets masked.
    CheckConfig,
    /// Print the join token agents present (creating it if needed).
    Token,
    /// Print the gateway's peer id (creating the key if needed).
    PeerId,
    /// Exit 0 if the running gateway's /health/ready answers 200 (for container health checks).
    Health,
    /// List or revoke the running gateway's leases, through its admin API
    /// (found, with its token and TLS, from the same configuration as `health`).
    #[command(subcommand)]
    Leases(LeasesCmd),
    /// Copy the leases of the embedded store in the data dir into etcd
    /// (`store.etcd.*`), so a gateway growing into a fleet keeps every port.
    /// Run it with the gateway stopped; leases etcd already has are kept.
    MigrateStore,
}

#[derive(Subcommand, Debug)]
pub enum LeasesCmd {
    /// Print every lease: port, agent, tunnel, whether the agent is in
    /// session on this gateway, and when a session last used it.
    List,
    /// Revoke one lease: its port stops accepting new connections (open
    /// ones finish) and is freed; an agent in session is told why and asks
    /// for a new lease.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("lease").required(true).args(["agent", "port"])))]
pub struct RevokeArgs {
    /// The agent's peer id (with --tunnel).
    #[arg(long, requires = "tunnel", value_name = "PEER_ID")]
    pub agent: Option<String>,
    /// The tunnel's name (with --agent).
    #[arg(long, requires = "agent", value_name = "NAME")]
    pub tunnel: Option<String>,
    /// The leased port, instead of --agent and --tunnel.
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Why, as the agent logs it (default: revoked by the gateway's operator).
    #[arg(long, value_name = "TEXT")]
    pub reason: Option<String>,
}

impl Opts {
    pub fn load(&self) -> anyhow::Result<GatewayConfig> {
        let mut o = Overrides::default();
        o.set_list("listen", &self.listen);
        o.set_list("advertise", &self.advertise);
        o.set_list("admission.allow", &self.allow_peer);
        if let Some(v) = &self.port_range {
            o.set("leases.port_range", v.clone());
        }
        let cfg: GatewayConfig = self.common.load(o, GatewayConfig::LIST_KEYS)?;
        cfg.validate()?;
        Ok(cfg)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match cli.opts.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relaygate-gateway: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cli.command.unwrap_or(Cmd::Run) {
        Cmd::CheckConfig => {
            print!("{}", config::render(&cfg));
            Ok(())
        }
        Cmd::Token => token(&cfg),
        Cmd::PeerId => {
            app::load_identity(&cfg).map(|(k, _)| println!("{}", k.public().to_peer_id()))
        }
        Cmd::Health => relaygate_common::admin::probe_ready(cfg.admin_listen(), &cfg.admin)
            .map_err(anyhow::Error::msg),
        Cmd::Leases(cmd) => leases(&cfg, cmd),
        Cmd::MigrateStore => migrate_store(&cfg),
        Cmd::Run => run(cfg, cli.opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relaygate-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn token(cfg: &GatewayConfig) -> anyhow::Result<()> {
    match app::load_token(cfg)? {
        Some((t, _)) => {
            println!("{}", t.expose());
            Ok(())
        }
        None => anyhow::bail!("join tokens are off (admission.tokens = false): admit agents by peer id in admission.allow"),
    }
}

/// `leases list` / `leases revoke` against the running gateway's admin API.
fn leases(cfg: &GatewayConfig, cmd: LeasesCmd) -> anyhow::Result<()> {
    let call = |method: &str, path: &str| {
        relaygate_common::admin::request(cfg.admin_listen(), &cfg.admin, method, path)
            .map_err(anyhow::Error::msg)
    };
    match cmd {
        LeasesCmd::List => {
            let (status, body) = call("GET", "/v1/leases")?;
            if status != 200 {
                anyhow::bail!("the admin API answered HTTP {status}: {}", body.trim());
            }
            let rows: Vec<crate::lease::lifecycle::LeaseView> =
                serde_json::from_str(&body).context("unexpected answer from /v1/leases")?;
            print!(
                "{}",
                lease_table(&rows, relaygate_common::clock::unix_now())
            );
            Ok(())
        }
        LeasesCmd::Revoke(a) => {
            let mut query: Vec<(&str, String)> = match (a.agent, a.tunnel, a.port) {
                (Some(agent), Some(tunnel), None) => vec![("agent", agent), ("tunnel", tunnel)],
                (None, None, Some(port)) => vec![("port", port.to_string())],
                _ => anyhow::bail!("name the lease by --agent and --tunnel, or by --port"),
            };
            if let Some(r) = a.reason {
                query.push(("reason", r));
            }
            let query: Vec<String> = query
                .iter()
                .map(|(k, v)| format!("{k}={}", percent_encode(v)))
                .collect();
            let (status, body) = call("DELETE", &format!("/v1/leases?{}", query.join("&")))?;
            if status != 204 {
                anyhow::bail!("not revoked (HTTP {status}): {}", body.trim());
            }
            println!("revoked");
            Ok(())
        }
    }
}

/// The `leases list` table, newest use relative to `now` (seconds).
fn lease_table(rows: &[crate::lease::lifecycle::LeaseView], now: u64) -> String {
    let ago = |r: &crate::lease::lifecycle::LeaseView| {
        if r.in_session {
            return "now".to_string();
        }
        let d = std::time::Duration::from_secs(now.saturating_sub(r.last_active));
        format!("{} ago", humantime_serde::re::humantime::format_duration(d))
    };
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            [
                r.port.to_string(),
                r.agent.clone(),
                r.tunnel.clone(),
                if r.in_session { "yes" } else { "no" }.to_string(),
                ago(r),
            ]
        })
        .collect();
    let head = ["PORT", "AGENT", "TUNNEL", "IN SESSION", "LAST ACTIVE"].map(String::from);
    let mut width = head.clone().map(|h| h.len());
    for row in &cells {
        for (w, c) in width.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&head).chain(&cells) {
        let line: Vec<String> = row
            .iter()
            .zip(width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Percent-encodes a query value (all but RFC 3986's unreserved bytes).
fn percent_encode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn migrate_store(cfg: &GatewayConfig) -> anyhow::Result<()> {
    use crate::store::{Claim, EmbeddedStore, EtcdStore, LeaseStore};
    let db = cfg.lease_db();
    let from = EmbeddedStore::open(&db)?;
    let leases = from.snapshot()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    let to = rt.block_on(EtcdStore::connect(&cfg.store.etcd))?;
    let (mut copied, mut kept) = (0, 0);
    for (lease, used) in &leases {
        // The store blocks on `rt` itself: called from outside it.
        let claim = to.claim(lease, None)?;
        match claim {
            Claim::Granted => {
                copied += 1;
                // Expiry keeps counting from the last use, not the move.
                if let Some(at) = used {
                    to.touch(std::slice::from_ref(&lease.key), *at)?;
                }
            }
            Claim::Existing(p) => {
                kept += 1;
                eprintln!("{}: etcd already leases it port {p}; kept", lease.key);
            }
            Claim::Held(holder) => {
                kept += 1;
                eprintln!(
                    "{}: port {} is leased to {holder} in etcd; kept that",
                    lease.key, lease.port
                );
            }
        }
    }
    println!(
        "{copied} of {} leases copied from {} into etcd ({kept} left as etcd had them)",
        leases.len(),
        db.display()
    );
    Ok(())
}

fn run(cfg: GatewayConfig, opts: Opts) -> anyhow::Result<()> {
    relaygate_common::telemetry::init(&cfg.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    // A reload reads the configuration as this start did: same file, same
    // flags, the environment as it is then.
    let opts = std::sync::Arc::new(opts);
    rt.block_on(app::run(cfg, std::sync::Arc::new(move || opts.load())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::lifecycle::LeaseView;

    #[test]
    fn the_lease_table_aligns_and_says_when() {
        let row = |port, tunnel: &str, in_session, last_active| LeaseView {
            agent: "12D3KooWagent".into(),
            tunnel: tunnel.into(),
            port,
            in_session,
            last_active,
        };
        let t = lease_table(
            &[row(20000, "node", true, 1000), row(20001, "db", false, 880)],
            1000,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "PORT   AGENT          TUNNEL  IN SESSION  LAST ACTIVE"
        );
        assert_eq!(lines[1], "20000  12D3KooWagent  node    yes         now");
        assert_eq!(lines[2], "20001  12D3KooWagent  db      no          2m ago");
        assert_eq!(percent_encode("a b/é"), "a%20b%2F%C3%A9");
    }
}
