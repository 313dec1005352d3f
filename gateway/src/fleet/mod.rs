//! What the gateways of a fleet share through etcd beyond leases (which the
//! lease store holds): the ban list ([`bans`]) and who is in the fleet
//! ([`members`]), and the public connections one gateway carries to another
//! ([`forward`], over the sockets [`ports`] hands out, on the lanes of
//! [`links`]).

pub mod bans; // bans made on any gateway hold on every gateway, within a second
pub mod forward; // public connections carried to the gateway that holds their agent
pub mod links; // lanes this gateway dials to the others, which forwarded connections ride
pub mod members; // each gateway's record under an etcd lease; the fleet's view
pub mod ports; // who holds each leased port's socket here: a session or the forwarder
pub mod token; // one join token for the fleet, kept in etcd
