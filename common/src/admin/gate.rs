//! Who gets through to the admin API: the bearer token when one is set,
//! else only requests naming this machine (no rebound DNS names); and never
//! a change requested by another site's page.

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
};

use super::AdminAuth;

pub(super) async fn require_token(
    State(auth): State<AdminAuth>,
    req: Request,
    next: Next,
) -> Response {
    if let Some(why) = cross_site(&req) {
        return (
            StatusCode::FORBIDDEN,
            format!("admin API: refused a cross-site request ({why}); changes come from the console's own page, the CLI or a client that sends no Origin\n"),
        )
            .into_response();
    }
    let Some(token) = &auth.token else {
        // Open on loopback: only to clients that name it by address or as
        // localhost. A page in a local browser whose name was rebound to
        // 127.0.0.1 sends its own name, and must not ban 0.0.0.0/0.
        if !host_is_local(req.headers().get(header::HOST)) {
            return (
                StatusCode::MISDIRECTED_REQUEST,
                "admin API: without admin.token it answers only requests for localhost or an IP address\n",
            )
                .into_response();
        }
        return next.run(req).await;
    };
    let path = req.uri().path();
    if auth.open_paths.iter().any(|p| p == path) || crate::admin_ui::is_asset(path) {
        return next.run(req).await;
    }
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(t) if token.matches(t) => next.run(req).await,
        _ => (
            StatusCode::UNAUTHORIZED,
            "admin API: missing or wrong bearer token\n",
        )
            .into_response(),
    }
}

/// Why a request that changes something comes from another site's page,
/// if it does: a form or script there may POST to a loopback admin API with
/// no token (only the Host check stands in its way, and the browser names
/// the API's own address). Browsers say where a request comes from in
/// `Sec-Fetch-Site` and `Origin`; the console's own page is same-origin, and
/// the CLI and curl send neither.
fn cross_site(req: &Request) -> Option<String> {
    use axum::http::Method;
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return None;
    }
    let h = req.headers();
    let text = |name| {
        h.get(name)
            .and_then(|v: &axum::http::HeaderValue| v.to_str().ok())
    };
    if let Some(site) = text("sec-fetch-site") {
        if site == "cross-site" || site == "same-site" {
            return Some(format!("Sec-Fetch-Site: {site}"));
        }
    }
    let origin = text("origin")?;
    let host = text("host").unwrap_or_default();
    let authority = origin.split_once("://").map(|(_, a)| a);
    match authority {
        Some(a) if a.eq_ignore_ascii_case(host) => None,
        _ => Some(format!("Origin {origin} is not this API's {host}")),
    }
}

/// Whether a Host header names this machine the way only a local client
/// does: an IP address or `localhost`, with any port, or no Host at all
/// (HTTP/1.0).
fn host_is_local(host: Option<&axum::http::HeaderValue>) -> bool {
    let Some(host) = host else {
        return true;
    };
    let Ok(host) = host.to_str() else {
        return false;
    };
    let local = |name: &str| {
        name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
    };
    if local(host) {
        return true;
    }
    // `[v6]:port` or `name:port`.
    let name = match host.rsplit_once(':') {
        Some((name, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => return false,
    };
    match name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => local(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_from_another_site_are_refused() {
        let req = |method: &str, headers: &[(&str, &str)]| {
            let mut b = axum::http::Request::builder()
                .method(method)
                .uri("/v1/reload")
                .header("host", "127.0.0.1:9600");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(axum::body::Body::empty()).unwrap()
        };
        // The CLI, curl: no Origin.
        assert!(cross_site(&req("POST", &[])).is_none());
        // The console's own page.
        let own = [
            ("origin", "http://127.0.0.1:9600"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert!(cross_site(&req("POST", &own)).is_none());
        // Another site's form or script.
        assert!(cross_site(&req("POST", &[("origin", "http://evil.example")])).is_some());
        assert!(cross_site(&req("DELETE", &[("origin", "null")])).is_some());
        assert!(cross_site(&req("POST", &[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&req("PUT", &[("origin", "http://localhost:3000")])).is_some());
        // Reading is not changing: a GET from anywhere meets the Host check only.
        assert!(cross_site(&req("GET", &[("origin", "http://evil.example")])).is_none());
    }

    #[test]
    fn only_local_names_reach_an_open_admin_api() {
        let h = |v: &str| host_is_local(Some(&axum::http::HeaderValue::from_str(v).unwrap()));
        for ok in [
            "127.0.0.1:9600",
            "localhost:9600",
            "LOCALHOST",
            "[::1]:9600",
            "10.0.0.7:9600",
            "::1",
        ] {
            assert!(h(ok), "{ok}");
        }
        for bad in [
            "rebind.example:9600",
            "evil.example",
            "localhost.evil.example:9600",
            "[::1",
        ] {
            assert!(!h(bad), "{bad}");
        }
        assert!(host_is_local(None), "HTTP/1.0 without Host");
    }
}
