//! nftables rulesets of a LAN router: NAT, a stateful firewall, and the
//! removable partition. Each script is one atomic `nft -f` transaction and
//! replaces its table (`add table` + `delete table` first, so re-applying works
//! on nft 1.0.6, which has no `destroy`).

use super::{Nat, WAN};

/// NAT for IPv4 and IPv6 (one `inet` table), and a firewall that only lets
/// replies in.
pub(crate) fn nat_ruleset(nat: Nat) -> String {
    let masquerade = match nat {
        // Keeps the source port when free: endpoint-independent mapping in practice.
        Nat::Masquerade => "masquerade",
        // A fresh random port per connection: symmetric NAT, no port prediction.
        Nat::Symmetric => "masquerade random,fully-random",
    };
    format!(
        r#"table inet rg_nat
delete table inet rg_nat
table inet rg_nat {{
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{WAN}" {masquerade}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    ct state established,related accept
    iifname "{WAN}" drop
  }}
  # Real NATs ignore unsolicited packets to their WAN address; a Linux router
  # would answer with RST / port-unreachable, and conntrack would record the
  # stray packet and remap later punches. Dropping here, before the conntrack
  # entry is confirmed, makes hole punching behave as on the internet.
  chain input {{
    type filter hook input priority filter; policy accept;
    iifname "{WAN}" ct state established,related accept
    # Neighbour discovery is not tracked by conntrack; without it no IPv6
    # reply could find the router's WAN address.
    iifname "{WAN}" icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept
    iifname "{WAN}" drop
  }}
}}
"#
    )
}

/// Drops everything crossing the WAN link, both directions, router included.
/// Priority -10 runs before the NAT table's chains, and a drop is final.
pub(crate) fn partition_ruleset(on: bool) -> String {
    let mut s = String::from("table inet rg_partition\ndelete table inet rg_partition\n");
    if on {
        s += &format!(
            r#"table inet rg_partition {{
  chain forward {{ type filter hook forward priority -10; iifname "{WAN}" drop; oifname "{WAN}" drop; }}
  chain input {{ type filter hook input priority -10; iifname "{WAN}" drop; }}
  chain output {{ type filter hook output priority -10; oifname "{WAN}" drop; }}
}}
"#
        );
    }
    s
}
