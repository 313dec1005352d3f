//! The guard's bans, rates and automatic bans, unit by unit.

use std::time::Duration;

use super::*;

fn guard(cfg: GuardConfig) -> Arc<Guard> {
    Guard::new(
        cfg,
        Arc::new(Metrics::new()),
        Arc::new(crate::overload::Overload::new(0)),
    )
}

#[test]
fn bans_by_cidr_and_peer_expire_and_lift() {
    let peer = PeerId::random();
    let g = guard(GuardConfig {
        blacklist: vec![BanRequest {
            target: "198.51.100.0/24".parse().unwrap(),
            reason: "scanner".into(),
            ttl: None,
        }],
        ..Default::default()
    });
    let inside: IpAddr = "198.51.100.7".parse().unwrap();
    let outside: IpAddr = "203.0.113.7".parse().unwrap();
    assert_eq!(g.check_ip(inside, Action::Connection), Err(Refused::Banned));
    assert_eq!(g.check_ip(outside, Action::Connection), Ok(()));
    g.ban(
        BanRequest {
            target: BanTarget::Peer(peer),
            reason: "test".into(),
            ttl: Some(Duration::from_millis(50)),
        },
        BanSource::Admin,
    );
    assert_eq!(g.check_peer(&peer, Action::Circuit), Err(Refused::Banned));
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(g.check_peer(&peer, Action::Circuit), Ok(()), "expired");
    assert!(g.unban(&"198.51.100.0/24".parse().unwrap()));
    assert_eq!(g.check_ip(inside, Action::Connection), Ok(()));
    assert!(g.list().is_empty());
}

#[test]
fn rates_and_automatic_bans() {
    let g = guard(GuardConfig {
        circuits_per_ip: Rate::new(1, 2),
        violations_before_ban: 3,
        ..Default::default()
    });
    let ip: IpAddr = "203.0.113.9".parse().unwrap();
    assert!(g.check_ip(ip, Action::Circuit).is_ok());
    assert!(g.check_ip(ip, Action::Circuit).is_ok());
    assert_eq!(
        g.check_ip(ip, Action::Circuit),
        Err(Refused::RateLimited(Action::Circuit))
    );
    let peer = PeerId::random();
    assert!(g.violation(Offender::Peer(peer), "x").is_none());
    assert!(g.violation(Offender::Peer(peer), "x").is_none());
    let ban = g.violation(Offender::Peer(peer), "x");
    assert!(ban.is_some_and(|b| b.source == BanSource::Automatic && b.expires.is_some()));
    assert!(g.is_banned_peer(&peer));
    assert!("not a target".parse::<BanTarget>().is_err());
    assert_eq!(
        "203.0.113.9".parse::<BanTarget>().map(|t| t.to_string()),
        Ok("203.0.113.9/32".to_string())
    );
}

#[test]
fn a_source_producing_banned_peer_ids_is_banned_itself() {
    let g = guard(GuardConfig {
        violations_before_ban: 1,
        peer_bans_before_source_ban: 3,
        ..Default::default()
    });
    // One IPv6 host hopping addresses inside its /64, a fresh id each time.
    let ips: Vec<IpAddr> = ["2001:db8:7:7::1", "2001:db8:7:7::2", "2001:db8:7:7:ffff::3"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let neighbour: IpAddr = "2001:db8:7:8::1".parse().unwrap();
    for (i, ip) in ips.iter().enumerate() {
        let peer = PeerId::random();
        g.connected(peer, *ip);
        let earned = g.peer_violation(peer, "garbage");
        assert_eq!(earned[0], BanTarget::Peer(peer));
        if i < 2 {
            assert_eq!(earned.len(), 1, "not yet the source");
            assert!(!g.is_banned_ip(*ip));
        } else {
            assert_eq!(
                earned[1],
                BanTarget::Net("2001:db8:7:7::/64".parse().unwrap()),
                "the third banned id bans its /64"
            );
        }
        g.disconnected(peer, *ip);
    }
    assert!(g.is_banned_ip("2001:db8:7:7:1234::9".parse().unwrap()));
    assert!(!g.is_banned_ip(neighbour), "the next /64 is someone else");
    assert_eq!(
        g.check_ip("2001:db8:7:7::42".parse().unwrap(), Action::Connection),
        Err(Refused::Banned)
    );
    assert!(
        g.peer_sources.lock().unwrap().is_empty(),
        "sources forgotten on close"
    );
}

#[test]
fn one_banned_peer_with_many_connections_counts_once_towards_its_source() {
    let g = guard(GuardConfig {
        violations_before_ban: 1,
        peer_bans_before_source_ban: 3,
        ..Default::default()
    });
    let ip: IpAddr = "198.51.100.7".parse().unwrap();
    let peer = PeerId::random();
    for _ in 0..3 {
        g.connected(peer, ip);
    }
    let earned = g.peer_violation(peer, "garbage");
    assert_eq!(
        earned,
        vec![BanTarget::Peer(peer)],
        "the peer, not its source"
    );
    assert!(!g.is_banned_ip(ip));
}

#[test]
fn rates_key_on_the_ipv6_prefix() {
    let g = guard(GuardConfig {
        connections_per_ip: Rate::new(1, 2),
        ..Default::default()
    });
    for i in 1..=2 {
        let ip: IpAddr = format!("2001:db8:1:1::{i}").parse().unwrap();
        assert!(g.check_ip(ip, Action::Connection).is_ok());
    }
    let third: IpAddr = "2001:db8:1:1:9::9".parse().unwrap();
    assert_eq!(
        g.check_ip(third, Action::Connection),
        Err(Refused::RateLimited(Action::Connection)),
        "a fresh address in the same /64 shares its bucket"
    );
    assert!(g
        .check_ip("2001:db8:1:2::1".parse().unwrap(), Action::Connection)
        .is_ok());
}

#[test]
fn a_reload_changes_configured_bans_only_and_new_rates_apply() {
    let req = |t: &str| BanRequest {
        target: t.parse().unwrap(),
        reason: "cfg".into(),
        ttl: None,
    };
    let g = guard(GuardConfig {
        blacklist: vec![req("198.51.100.1/32"), req("198.51.100.2/32")],
        tunnel_connections_per_ip: Rate::new(0, 0),
        ..Default::default()
    });
    // An operator's own ban on a target the configuration will list too.
    g.ban(req("198.51.100.3/32"), BanSource::Admin);
    let added_before = g
        .metrics
        .bans_added
        .get_or_create(&relaygate_common::metrics::ReasonLabels::new("config"))
        .get();
    let next = GuardConfig {
        // .1 stays as it was, .2 goes, .3 and .4 are listed now.
        blacklist: vec![
            req("198.51.100.1/32"),
            req("198.51.100.3/32"),
            req("198.51.100.4/32"),
        ],
        tunnel_connections_per_ip: Rate::new(1, 1),
        ..Default::default()
    };
    let added = g.reload(next);
    assert_eq!(
        added,
        vec![req("198.51.100.4/32").target],
        "only the new one"
    );
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(g.is_banned_ip(ip("198.51.100.1")));
    assert!(!g.is_banned_ip(ip("198.51.100.2")), "no longer listed");
    assert!(g.is_banned_ip(ip("198.51.100.4")));
    let by = |t: &str| {
        g.list()
            .into_iter()
            .find(|b| b.target.to_string() == t)
            .map(|b| b.source)
    };
    assert_eq!(
        by("198.51.100.3/32"),
        Some(BanSource::Admin),
        "the admin's ban stays the admin's"
    );
    let added_after = g
        .metrics
        .bans_added
        .get_or_create(&relaygate_common::metrics::ReasonLabels::new("config"))
        .get();
    assert_eq!(
        added_after - added_before,
        1,
        "an unchanged ban is not made again"
    );
    // The reloaded rate holds from now on.
    let src = ip("203.0.113.9");
    assert!(g.check_ip(src, Action::TunnelConnection).is_ok());
    assert!(g.check_ip(src, Action::TunnelConnection).is_err());
}
