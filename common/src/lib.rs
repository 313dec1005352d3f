//! relaygate-common: what the gateway and the agent both speak.
//!
//! Wire formats live in [`protocol`]; everything else here is shared plumbing
//! that both binaries would otherwise write twice.

pub mod admin; // admin HTTP listener: loopback default, bearer token, health + metrics routes
pub mod admin_ui; // the console: dashboard assets built in, and its live event stream
pub mod circuit; // circuit relay v2 wire format: hop/stop messages, voucher, framing
pub mod clock; // Unix seconds, as the admin API and etcd records carry them
pub mod config; // layered config loading (embedded defaults, TOML file, env, --set) and secrets
pub mod dgram; // UDP tunnels: the datagram channel (QUIC datagrams, libp2p identities) and its frames
pub mod files; // files written whole or not at all (temp file, sync, rename)
pub mod identity; // libp2p identity key files: create 0600, load protobuf or hex
pub mod idle; // idle timeouts for spliced connections
pub mod lane; // the tunnel data path: a few TLS connections per agent, multiplexed streams
pub mod meter; // per-direction byte accounting of a copy loop, and its pacer (bandwidth caps)
pub mod metrics; // label sets shared by both binaries' Prometheus metrics
pub mod names; // typed values: TunnelName, LeasePort, PortRange, Secret
pub mod nofile; // open-files limit: raise at start, warn with the number to set
pub mod probe; // a libp2p node's peer id, proven by its security handshake
pub mod protocol; // wire formats: control messages and the tunnel stream header
pub mod proxy; // PROXY protocol v1/v2 headers (ppp), with the peer-id TLV
pub mod proxy_transport; // libp2p TCP transport that reads PROXY headers from trusted balancers
pub mod shutdown; // SIGINT/SIGTERM and the drain deadline
pub mod splice; // bidirectional byte pump with half-close, resets and byte counters
pub mod streams; // raw libp2p streams: open toward a peer, inbound ones from a deep queue
pub mod telemetry; // tracing subscriber setup (text or JSON)
pub mod transport; // the libp2p swarm both ends build: TCP+Noise+yamux, QUIC-v1, DNS, tuning
