//! What the gateways of a fleet share through etcd beyond leases (which the
//! lease store holds): the ban list ([`bans`]) and who is in the fleet
//! ([`members`]).

pub mod bans; // bans made on any gateway hold on every gateway, within a second
pub mod members; // each gateway's record under an etcd lease; the fleet's view
