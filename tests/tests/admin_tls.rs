//! The admin API over TLS (rustls): with `admin.tls_cert` and `admin.tls_key`
//! it answers only HTTPS; the binaries' own client (`health`) verifies it
//! against the configured certificate; a non-loopback bind still needs a token.

use relaygate_common::admin::{get, AdminConfig};
use relaygate_tests::{
    procs::workspace_bin,
    stack::{here, http_get, Gateway, GatewaySpec},
};

#[test]
fn admin_api_speaks_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
        .expect("self-signed certificate");
    let cert = dir.path().join("admin.crt");
    let key = dir.path().join("admin.key");
    std::fs::write(&cert, ck.cert.pem()).expect("write cert");
    std::fs::write(&key, ck.key_pair.serialize_pem()).expect("write key");
    let tls_args = vec![
        "--set".to_string(),
        format!("admin.tls_cert={}", cert.display()),
        "--set".to_string(),
        format!("admin.tls_key={}", key.display()),
    ];
    let gw = Gateway::start(
        &here,
        GatewaySpec {
            extra: tls_args.clone(),
            ..Default::default()
        },
    );

    // Plain HTTP gets nothing.
    assert_eq!(
        http_get(gw.admin, "/health/live").0,
        0,
        "no plaintext answers"
    );

    // HTTPS, verified against the certificate, answers.
    let cfg = AdminConfig {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..Default::default()
    };
    let (status, body) = get(gw.admin, &cfg, "/metrics").expect("https GET");
    assert_eq!(status, 200);
    assert!(body.contains("relaygate_gateway_sessions_active"));

    // A request with a JSON body rides the same client, over TLS too.
    let agent = libp2p::PeerId::random();
    let (status, body) = relaygate_common::admin::request_json(
        gw.admin,
        &cfg,
        "PUT",
        &format!("/v1/agents/caps?agent={agent}"),
        Some(r#"{"inbound": 1000000, "outbound": 0, "burst": 0}"#),
    )
    .expect("https PUT");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"inbound\":1000000"), "{body}");

    // A different certificate is not trusted.
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).expect("cert");
    let other_cert = dir.path().join("other.crt");
    std::fs::write(&other_cert, other.cert.pem()).expect("write");
    let wrong = AdminConfig {
        tls_cert: Some(other_cert),
        ..Default::default()
    };
    assert!(
        get(gw.admin, &wrong, "/metrics").is_err(),
        "an unknown certificate is refused"
    );

    // The health subcommand uses the same configuration and succeeds.
    let out = std::process::Command::new(workspace_bin("relaygate-gateway"))
        .args(["--admin-listen", &gw.admin.to_string()])
        .args(&tls_args)
        .arg("health")
        .output()
        .expect("health");
    assert!(
        out.status.success(),
        "health over TLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Half the TLS settings is a clear configuration error.
    let out = std::process::Command::new(workspace_bin("relaygate-gateway"))
        .args(["--data-dir", &dir.path().join("d").display().to_string()])
        .args(["--set", &format!("admin.tls_cert={}", cert.display())])
        .args(["--admin-listen", "127.0.0.1:0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin.tls_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
