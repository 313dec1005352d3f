//! What the gateways of a fleet share through etcd beyond leases (which the
//! lease store holds): the ban list ([`bans`]).

pub mod bans; // bans made on any gateway hold on every gateway, within a second
