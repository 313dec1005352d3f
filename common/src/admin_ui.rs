//! The operator's console: the dashboard's page, script and style, built
//! into the binary (nothing is loaded from outside), and the server-sent
//! event stream that keeps it live. Both binaries serve them at `/ui/` and
//! `/v1/events`; the page reads the overview's `role` to draw a gateway or
//! an agent.

use std::{convert::Infallible, time::Duration};

use axum::{
    http::header,
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Redirect, Response,
    },
    routing::get,
    Router,
};
use futures::Stream;

const INDEX: &str = include_str!("../ui/index.html");
const SCRIPT: &str = include_str!("../ui/app.js");
const STYLE: &str = include_str!("../ui/style.css");

/// The page may load only itself: no inline script, nothing from elsewhere,
/// and no other site may frame it. (Inline styles are harmless here.)
const POLICY: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'";

/// How often the event stream sends a fresh overview.
pub const EVENT_PERIOD: Duration = Duration::from_secs(1);

fn asset(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `/ui/` and its two assets. They carry no data: every figure the page
/// shows comes from the API, under the admin API's token.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route(
            "/ui/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
}

/// Whether `path` is one of the page's assets (served without the token:
/// they hold no data).
pub fn is_asset(path: &str) -> bool {
    matches!(path, "/ui" | "/ui/" | "/ui/app.js" | "/ui/style.css")
}

/// Server-sent events: `event: overview` with `snapshot()` as JSON, now and
/// every [`EVENT_PERIOD`] while the client stays.
pub fn overview_events<F>(snapshot: F) -> Sse<impl Stream<Item = Result<Event, Infallible>>>
where
    F: Fn() -> serde_json::Value + Send + 'static,
{
    let stream = futures::stream::unfold(
        (snapshot, None::<tokio::time::Interval>),
        |(snapshot, tick)| async move {
            let mut tick = match tick {
                Some(t) => t,
                None => {
                    let mut t = tokio::time::interval(EVENT_PERIOD);
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    t
                }
            };
            tick.tick().await;
            let event = Event::default()
                .event("overview")
                .data(snapshot().to_string());
            Some((Ok(event), (snapshot, Some(tick))))
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::default())
}
