//! relaygate's end-to-end test kit: real processes, real sockets, real networks.

pub mod browser; // headless chromium driven by tests/js/ui.mjs, for the console tests
pub mod circuitpeer; // a bare circuit relay v2 peer: reserve, open and accept circuits byte by byte
pub mod etcd; // a real etcd with its own data dir, for the lease store
pub mod fleetkit; // gateways of a fleet on a test etcd: start them, reach through them, read their view
pub mod labworld; // the NAT lab's usual world: gateway and remote on the internet, a node behind a NAT
pub mod load; // open-files limit, /proc figures, async echo, many held connections
pub mod netlab; // network namespaces: an internet, NAT routers, hosts, faults
pub mod nodes; // plain libp2p nodes: a rust lab-node on loopback, the js-libp2p harness
pub mod procs; // child processes: workspace binaries, captured logs, kill on drop
pub mod rawpeer; // a bare libp2p peer that sends the gateway hand-made (also malformed) input
pub mod stack; // gateway, agents and targets wired together on free ports
pub mod targets; // tunnel targets that measure: a counting sink, an endless source
pub mod udpkit; // UDP: an echo that records peers, many checked flows, rtt, throughput, a spoofed flood
