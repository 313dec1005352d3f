//! relaygate-agent: runs beside a node, dials out to a gateway, and delivers
//! the gateway's public connections to the node.
//!
//! Data flows one way: the [`session`] leases ports, the gateway opens a
//! [`tunnel`] stream per public connection (on the agent's [`lane`], or on the
//! session while no lane is up), [`deliver`] connects it to the target.
//! Between agents: a [`visitor`] opens a service stream to a peer (relayed,
//! then direct once DCUtR punches through), and that peer's [`services`]
//! connect it to the local service.

pub mod admin; // admin API routes: metrics, health, /v1/advertise, the console's overview, events, doctor
pub mod advertise; // advertised addresses: compute, log, write the file
pub mod app; // wiring: start everything, drain on signal
pub mod claims; // the nodes behind the tunnels, claimed at the gateway for circuits to their own peer ids
pub mod cli; // command line: flags, subcommands, config layering
pub mod config; // the configuration model
pub mod console; // the console's overview of the agent, and the doctor runs it shows
pub mod deliver; // connecting a tunnelled connection to the local target
pub mod doctor; // `doctor`: reachability, session, leases, dial-back, advertised addresses, rules
pub mod fleet; // sessions with several gateways of a fleet: join those that appear, drop those that leave
pub mod gateways; // the gateways this agent trusts, and their lanes
pub mod host; // libp2p host: gateway session, relay client, DCUtR, AutoNAT client
pub mod lane; // the lane to the gateway: TLS connection carrying tunnelled connections
pub mod limits; // caps on connections the agent opens, idle timeout
pub mod metrics; // Prometheus metrics
pub mod paths; // connections to peers: relayed or direct, hole-punch records
pub mod probe; // the node's own peer id, from a security handshake with it
pub mod services; // services offered to peers: allow-list, target, PROXY v2 peer id
pub mod session; // session with the gateway: dial, hello, leases, relay reservation, reconnect
pub mod state; // current session and lease status
pub mod strangers; // inbound connections only from the gateway and allow-listed peers
pub mod transparent; // transparent delivery: capability checks, nftables + policy routing rules
pub mod tunnel; // inbound tunnel streams: header, deliver, splice
pub mod udp; // UDP tunnels: the datagram channel to each gateway, a socket per flow toward the node
pub mod visitor; // `connect`: local port -> another agent's service, relay first, direct after DCUtR
