//! The HTTP server of a node: `/metrics`, `POST /sql`, `/healthz` and
//! `/readyz`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;
use vitaltrail_bus::datadir;
use vitaltrail_core::auth::Token;

use crate::{Error, Result};

/// Whether the process is ready to take readings.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the HTTP server serves.
#[derive(Clone)]
pub struct HttpConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The metrics to serve.
    pub registry: prometheus::Registry,
    /// The data directory (tokens, and the tables `POST /sql` reads).
    pub data_dir: PathBuf,
    /// Serve `POST /sql` (needs the `sql` feature).
    pub sql: bool,
    /// What `/readyz` asks; always ready without it.
    pub ready: Option<Readiness>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("sql", &self.sql)
            .finish_non_exhaustive()
    }
}

/// Serve, until `shutdown`:
/// - `GET /metrics` (Prometheus text), bearer token `<data>/keys/metrics.token`;
/// - `POST /sql` over `data_dir` when `sql`, bearer token `<data>/keys/sql.token`
///   (see `vitaltrail_query::http`);
/// - `GET /healthz`, unauthenticated, which says only `ok`: the process
///   exits when a stage dies, so a process that answers is serving;
/// - `GET /readyz`, unauthenticated: 200 `ready` once every ingest
///   connection is subscribed (a device publishing before that is
///   acknowledged by the broker and dropped: it gets no receipt), else 503.
///
/// Both tokens are created (mode 0600) on first use; neither is logged.
pub async fn run(cfg: HttpConfig, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    use axum::routing::get;
    let HttpConfig {
        listen,
        registry,
        data_dir,
        sql,
        ready,
    } = cfg;
    let metrics_token = datadir::load_or_create_token(&datadir::metrics_token_path(&data_dir))?;
    #[allow(unused_mut)]
    let mut app = axum::Router::new();
    #[cfg(feature = "sql")]
    if sql {
        let token = datadir::load_or_create_token(&datadir::sql_token_path(&data_dir))?;
        app = app.merge(vitaltrail_query::http::router(
            vitaltrail_query::http::SqlService {
                data_dir: data_dir.clone(),
                token,
                limits: vitaltrail_query::QueryLimits::default(),
                concurrent: Arc::new(tokio::sync::Semaphore::new(
                    vitaltrail_query::http::MAX_CONCURRENT_QUERIES,
                )),
            },
        ));
    }
    #[cfg(not(feature = "sql"))]
    let _ = sql;
    let app = app
        .route(
            "/metrics",
            get(move |headers: axum::http::HeaderMap| {
                let registry = registry.clone();
                let token = metrics_token.clone();
                async move { metrics_page(&headers, &token, &registry) }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.as_ref().is_none_or(|r| r());
                async move {
                    use axum::http::StatusCode;
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| Error::io(format!("binding the HTTP listener {listen}"), e))?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
        .map_err(|e| Error::io("the HTTP server", e))
}

fn metrics_page(
    headers: &axum::http::HeaderMap,
    token: &Token,
    registry: &prometheus::Registry,
) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let h = |n: header::HeaderName| headers.get(n).map(|v| v.as_bytes());
    if let Err(r) = token.authorize(h(header::ORIGIN), h(header::HOST), h(header::AUTHORIZATION)) {
        let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN);
        return (
            status,
            [("www-authenticate", "Bearer")],
            format!("{}\n", r.message()),
        )
            .into_response();
    }
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
