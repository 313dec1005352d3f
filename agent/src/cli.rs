//! Command line of `relaygate-agent`. Flags override the config file and
//! `RELAYGATE_*` environment; `--set key=value` reaches every config key.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use relaygate_common::config::{self, CommonOpts, Overrides};

use crate::{
    app,
    config::{AgentConfig, ServiceConfig, ServicePeer, TunnelConfig, VisitorConfig},
};

#[derive(Parser, Debug)]
#[command(
    name = "relaygate-agent",
    version,
    about = "Runs beside a P2P node, dials out to a relaygate gateway and delivers its public connections to the node",
    after_help = "Every config key can also be set as RELAYGATE_<SECTION>__<KEY> (e.g. RELAYGATE_GATEWAY__TOKEN) or with --set section.key=value. See README.md for all keys."
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
    /// Gateway multiaddr ending in /p2p/<peer id>, repeatable [gateway.addresses].
    #[arg(long, global = true, value_name = "MULTIADDR")]
    pub gateway: Vec<String>,
    /// Join token printed by the gateway; prefer RELAYGATE_GATEWAY__TOKEN or --token-file, which ps cannot show [gateway.token].
    #[arg(long, global = true)]
    pub token: Option<String>,
    /// File holding the join token [gateway.token_file].
    #[arg(long, global = true)]
    pub token_file: Option<String>,
    /// A tunnel, repeatable; replaces [[tunnels]] from the config:
    /// NAME=HOST:PORT[@PUBLIC_PORT][,deliver=plain|transparent|proxy-v1|proxy-v2][,proto=tcp|udp|both][,node_peer_id=ID|auto][,advertise_file=PATH]
    #[arg(
        long,
        global = true,
        value_name = "NAME=HOST:PORT[@PORT][,OPTION=VALUE]"
    )]
    pub tunnel: Vec<TunnelConfig>,
    /// A service offered to peers by peer id, repeatable; replaces [[services]]:
    /// NAME=HOST:PORT,allow=PEER_ID[,allow=PEER_ID][,proxy=v2]
    #[arg(
        long,
        global = true,
        value_name = "NAME=HOST:PORT,allow=PEER_ID[,OPTION=VALUE]"
    )]
    pub service: Vec<ServiceConfig>,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run the agent (the default).
    Run,
    /// Check the configuration and print the effective one, secrets masked.
    CheckConfig,
    /// Print the agent's peer id (creating the key if needed), for the gateway's admission.allow.
    PeerId,
    /// Exit 0 if the running agent's /health/ready answers 200 (session up, every tunnel leased).
    Health,
    /// Check the gateway, the running agent's session and leases, a dial-back to each
    /// leased port, the advertised addresses and transparent rules; exit 1 on any problem.
    Doctor,
    /// Run the agent with a local port that reaches another agent's service,
    /// through the gateway's relay and, once hole punching succeeds, directly.
    Connect {
        /// The peer offering the service: a peer id (reached through this
        /// agent's gateway) or a full circuit multiaddr ending in /p2p/<peer id>.
        peer: ServicePeer,
        /// The service's name on that peer.
        #[arg(value_name = "SERVICE")]
        service_name: relaygate_common::names::ServiceName,
        /// Local address to listen on, e.g. 127.0.0.1:2222.
        #[arg(long)]
        listen: std::net::SocketAddr,
    },
    /// Print the shell commands that set up transparent delivery (for an init container with NET_ADMIN).
    TransparentRules {
        /// Print the commands that remove them instead.
        #[arg(long)]
        remove: bool,
    },
}

impl Opts {
    pub fn load(&self) -> anyhow::Result<AgentConfig> {
        let mut o = Overrides::default();
        o.set_list("gateway.addresses", &self.gateway);
        for (key, v) in [
            ("gateway.token", &self.token),
            ("gateway.token_file", &self.token_file),
        ] {
            if let Some(v) = v {
                o.set(key, v.clone());
            }
        }
        let mut cfg: AgentConfig = self.common.load(o, AgentConfig::LIST_KEYS)?;
        if !self.tunnel.is_empty() {
            cfg.tunnels = self.tunnel.clone();
        }
        if !self.service.is_empty() {
            cfg.services = self.service.clone();
        }
        Ok(cfg)
    }
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cmd = cli.command.unwrap_or(Cmd::Run);
    let cfg = match cli.opts.load() {
        Ok(mut c) => {
            if let Cmd::Connect {
                peer,
                service_name,
                listen,
            } = &cmd
            {
                c.connect.push(VisitorConfig {
                    peer: peer.clone(),
                    service: service_name.clone(),
                    listen: *listen,
                });
            }
            c
        }
        Err(e) => {
            eprintln!("relaygate-agent: {e:#}");
            return ExitCode::from(2);
        }
    };
    let result = match cmd {
        Cmd::PeerId => app::load_identity(&cfg).map(|k| println!("{}", k.public().to_peer_id())),
        Cmd::CheckConfig => cfg
            .validate()
            .map_err(Into::into)
            .map(|()| print!("{}", config::render(&cfg))),
        Cmd::TransparentRules { remove } => {
            let script = if remove {
                crate::transparent::remove_script(&cfg.transparent)
            } else {
                crate::transparent::install_script(&cfg.transparent)
            };
            print!("{script}");
            Ok(())
        }
        Cmd::Doctor => doctor(cfg),
        Cmd::Health => relaygate_common::admin::probe_ready(cfg.admin_listen(), &cfg.admin)
            .map_err(anyhow::Error::msg),
        Cmd::Run | Cmd::Connect { .. } => run(cfg),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("relaygate-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn doctor(cfg: AgentConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    if rt.block_on(crate::doctor::run(&cfg))? {
        Ok(())
    } else {
        anyhow::bail!("doctor found problems (see above)")
    }
}

fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    relaygate_common::telemetry::init(&cfg.log)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start tokio")?;
    rt.block_on(app::run(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_and_subcommands_are_consistent() {
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "relaygate-agent",
            "--service",
            "ssh=127.0.0.1:22,allow=12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            "connect",
            "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
            "ssh",
            "--listen",
            "127.0.0.1:2222",
        ])
        .expect("parses");
        assert_eq!(cli.opts.service.len(), 1);
        assert!(matches!(cli.command, Some(Cmd::Connect { .. })));
    }
}
