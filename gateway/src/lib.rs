//! relaygate-gateway: gives nodes behind NAT a stable public address.
//!
//! Data flows one way: a public [`listener`] accepts a connection, the agent's
//! [`session`] owns the port, a stream of the agent's [`lanes`] lane (or of
//! its session) carries it to the agent. Peers
//! reached by peer id go through the relay [`hop`]: a [`reservations`] entry
//! names the destination, a [`circuit`] carries the bytes.

pub mod admin; // admin API routes: metrics, health, /v1/agents
pub mod admission; // allow-list and join token
pub mod app; // wiring: start everything, print join instructions, drain on signal
pub mod banlist; // bans: peer ids in a map, networks in a prefix trie
pub mod banner; // the start banner and the addresses agents dial
pub mod caps; // bandwidth caps per agent and per tunnel: token buckets the copy loops wait on
pub mod circuit; // one relayed circuit: copy both ways, count, enforce Limit/idle/rate
pub mod cli; // command line: flags, subcommands, config layering
pub mod config; // the configuration model
pub mod conns; // the public connections open now, with their real sources and bytes, for the console
pub mod dataplane; // what every public port shares, and the settings a reload changes
pub mod dialback; // doctor's dial-back: connect to an agent's own leased port from the gateway
pub mod fleet; // what gateways sharing etcd share: bans, membership, forwarding
pub mod gate; // the guard on libp2p connections: refuse by IP before the handshake, by peer after
pub mod guard; // blacklist, per-IP / per-peer token buckets, automatic bans
pub mod hop; // circuit relay v2 hop: RESERVE, CONNECT, STOP
pub mod host; // libp2p host: listeners, identify, ping, AutoNAT server, stream protocols
pub mod lanes; // agents' lanes: the TLS connections that carry tunnelled connections
pub mod lease; // port allocation per (agent, tunnel)
pub mod listener; // leased public ports: accept, open tunnel stream, forward
pub mod metrics; // Prometheus metrics
pub mod nodes; // node peer ids agents front, checked through their tunnels: circuits to them
pub mod overload; // memory overload: refuse new work above limits.max_memory
pub mod rates; // the guard's token buckets per source and per peer, swapped whole on reload
pub mod registry; // live sessions and per-tunnel counters
pub mod reload; // SIGHUP and POST /v1/reload: apply what may change while running, refuse the rest by name
pub mod reservations; // relay reservations and circuit slots, within the caps
pub mod session; // control streams: admit, lease, bind, keep alive
pub mod session_lane; // a lane on one session stream, for agents without a lane of their own
pub mod session_stream; // the fallback data path: a public connection on a session stream
pub mod shares; // per-source shares of pools: lane handshakes, leased-port connections
pub mod stall; // circuits whose reader stopped: a share per peer, the oldest ends first
pub mod store; // lease persistence: LeaseStore trait, embedded redb store
pub mod udp; // UDP tunnels: agents' datagram channels, leased UDP ports and their flows
