//! Gateways of a fleet on a test etcd, and what tests ask of them.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use crate::{
    etcd::Etcd,
    procs::free_tcp_range,
    stack::{here, http_get, Agent, Echo, Gateway, GatewaySpec, Transport},
};

/// An agent on `gw` (over QUIC, with its join token) whose one tunnel,
/// `echo`, leads to `echo`.
pub fn echo_agent(gw: &Gateway, echo: &Echo, extra: &[String]) -> Agent {
    Agent::start(
        &here,
        gw,
        Transport::Quic,
        &[echo.tunnel("echo")],
        true,
        extra,
    )
}

pub fn on_etcd(etcd: &Etcd, bind: &str, range: &str) -> Gateway {
    on_etcd_with(etcd, bind, range, &[])
}

pub fn on_etcd_with(etcd: &Etcd, bind: &str, range: &str, more: &[&str]) -> Gateway {
    let mut extra = vec![
        "--set".to_string(),
        "store.kind=etcd".into(),
        "--set".into(),
        format!("store.etcd.endpoints={}", etcd.endpoint()),
    ];
    for m in more {
        extra.extend(["--set".to_string(), m.to_string()]);
    }
    Gateway::start(
        &here,
        GatewaySpec {
            bind: bind.into(),
            public_ip: bind.into(),
            port_range: Some(range.into()),
            extra,
            ..Default::default()
        },
    )
}

pub fn range() -> String {
    let p = free_tcp_range(10);
    format!("{p}-{}", p + 9)
}

/// What comes back through `host:port`; nothing when it does not answer.
pub fn echo_through(host: &str, port: u16, data: &[u8]) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect((host, port)) else {
        return Vec::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// The fleet's view (`/v1/fleet`): gateway peer ids, and the agents each holds.
pub fn fleet(gw: &Gateway) -> Vec<(String, Vec<String>)> {
    let body = http_get(gw.admin, "/v1/fleet").1;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["gateways"]
        .as_array()
        .map(|gs| {
            gs.iter()
                .map(|g| {
                    let agents = g["agents"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(String::from))
                                .collect()
                        })
                        .unwrap_or_default();
                    (
                        g["peer_id"].as_str().unwrap_or_default().to_string(),
                        agents,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}
