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
    /// Copy the leases of the embedded store in the data dir into etcd
    /// (`store.etcd.*`), so a gateway growing into a fleet keeps every port.
    /// Run it with the gateway stopped; leases etcd already has are kept.
    MigrateStore,
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
        Cmd::MigrateStore => migrate_store(&cfg),
        Cmd::Run => run(cfg),
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

fn migrate_store(cfg: &GatewayConfig) -> anyhow::Result<()> {
    use crate::store::{Claim, EmbeddedStore, EtcdStore, LeaseStore};
    let db = cfg.lease_db();
    let from = EmbeddedStore::open(&db)?;
    let leases = from.load()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    let to = rt.block_on(EtcdStore::connect(&cfg.store.etcd))?;
    let (mut copied, mut kept) = (0, 0);
    for lease in &leases {
        // The store blocks on `rt` itself: called from outside it.
        let claim = to.claim(lease, None)?;
        match claim {
            Claim::Granted => copied += 1,
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

fn run(cfg: GatewayConfig) -> anyhow::Result<()> {
    relaygate_common::telemetry::init(&cfg.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    rt.block_on(app::run(cfg))
}
