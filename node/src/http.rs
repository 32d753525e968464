//! The HTTP server of a node: `/metrics`, `POST /sql` and
//! `GET /fhir/Observation`, `POST /alerts/<id>/ack`, `/healthz` and
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
    /// The alert engine of this process, for `POST /alerts/<id>/ack`.
    pub alerts: Option<vitaltrail_alerts::AckHandle>,
}

impl std::fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("listen", &self.listen)
            .field("data_dir", &self.data_dir)
            .field("sql", &self.sql)
            .field("alerts", &self.alerts.is_some())
            .finish_non_exhaustive()
    }
}

/// Serve, until `shutdown`:
/// - `GET /metrics` (Prometheus text), bearer token `<data>/keys/metrics.token`;
/// - `POST /sql` over `data_dir` when `sql`, bearer token `<data>/keys/sql.token`
///   (see `vitaltrail_query::http`);
/// - `POST /alerts/<id>/ack` when this process runs the alert engine
///   ([`acknowledge`]), with a viewer's token or the operator's
///   (`<data>/keys/alerts.token`);
/// - `GET /healthz`, unauthenticated, which says only `ok`: the process
///   exits when a stage dies, so a process that answers is serving;
/// - `GET /readyz`, unauthenticated: 200 `ready` once every ingest
///   connection is subscribed (a device publishing before that is
///   acknowledged by the broker and dropped: it gets no receipt), else 503.
///
/// The tokens are created (mode 0600) on first use; none is logged.
pub async fn run(cfg: HttpConfig, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    use axum::routing::get;
    let HttpConfig {
        listen,
        registry,
        data_dir,
        sql,
        ready,
        alerts,
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
    // Always routed: where no engine runs, a clear answer rather than a
    // bare 404 that reads as "no such alarm".
    let acks = match alerts {
        Some(handle) => Some(Arc::new(Acks {
            handle,
            operator: datadir::load_or_create_token(&datadir::alerts_token_path(&data_dir))?,
            viewers: vitaltrail_mqtt::viewers::ViewersFile::new(
                vitaltrail_mqtt::viewers::viewers_file(&data_dir),
            ),
        })),
        None => None,
    };
    app = app.route(
        "/alerts/{*rest}",
        axum::routing::post(
            move |axum::extract::Path(rest): axum::extract::Path<String>,
                  headers: axum::http::HeaderMap,
                  body: axum::body::Bytes| {
                let acks = acks.clone();
                async move {
                    match acks {
                        Some(acks) => acknowledge(&acks, &rest, &headers, &body).await,
                        None => refused(
                            503,
                            "unavailable",
                            "no alert engine runs in this process: acknowledge at the HTTP \
                             server of `vitaltrail up` or `vitaltrail alerts`",
                        ),
                    }
                }
            },
        )
        // An acknowledgement's body is `{"as": "<name>"}` at most.
        .layer(axum::extract::DefaultBodyLimit::max(4096)),
    );
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

/// What `POST /alerts/<id>/ack` needs.
struct Acks {
    handle: vitaltrail_alerts::AckHandle,
    operator: Token,
    viewers: vitaltrail_mqtt::viewers::ViewersFile,
}

fn json_answer(status: u16, body: serde_json::Value) -> axum::response::Response {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        format!("{body}\n"),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
    }
    r
}

fn refused(status: u16, code: &str, msg: &str) -> axum::response::Response {
    json_answer(status, serde_json::json!({ "error": msg, "code": code }))
}

/// `POST /alerts/<id>/ack`: acknowledge alarm `<id>` (its `/`s as they
/// are, or percent-encoded).
///
/// - A nurse station presents its own token (`vitaltrail viewers add`
///   writes `<name>.token`): the acknowledgement is recorded as by the
///   viewer's name, `via: "viewer"`, and only alarms of its wards are
///   taken. The body is not read: who is never taken from it.
/// - The operator presents `<data>/keys/alerts.token` and names on whose
///   behalf with the body `{"as": "<name>"}`: recorded `via: "operator"`,
///   any ward (`vitaltrail alerts ack ID --as NAME`).
///
/// The time is the engine's clock when it takes the acknowledgement. 200
/// answers the `acknowledged` event once it is durable; 400 a malformed
/// request, 401 no valid token, 403 another origin, 404 no such alarm the
/// caller may acknowledge held here (another ward's included), 409 already
/// acknowledged or cleared, 503 the engine busy, stopped, or not in this
/// process. Errors are `{"error", "code"}` (and `by`, `at_ms` or
/// `cleared_ms` for 409).
async fn acknowledge(
    acks: &Acks,
    rest: &str,
    headers: &axum::http::HeaderMap,
    body: &[u8],
) -> axum::response::Response {
    use axum::http::header;
    use vitaltrail_alerts::Actor;
    use vitaltrail_core::auth::Refusal;
    let Some(id) = rest.strip_suffix("/ack").filter(|id| !id.is_empty()) else {
        return refused(404, "not-found", "not found: POST /alerts/<alarm id>/ack");
    };
    let h = |n: header::HeaderName| headers.get(n).map(|v| v.as_bytes());
    let actor = match acks.operator.authorize(
        h(header::ORIGIN),
        h(header::HOST),
        h(header::AUTHORIZATION),
    ) {
        Ok(()) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct OnBehalf {
                #[serde(rename = "as")]
                name: String,
            }
            match serde_json::from_slice::<OnBehalf>(body) {
                Ok(b) => Actor::Operator { name: b.name },
                Err(e) => {
                    return refused(
                        400,
                        "invalid",
                        &format!(
                            "the operator acknowledges on someone's behalf: a JSON body {{\"as\": \"<name>\"}} ({e})"
                        ),
                    );
                }
            }
        }
        Err(r @ Refusal::CrossOrigin) => return refused(r.status(), "cross-origin", r.message()),
        Err(r @ Refusal::Unauthenticated) => {
            let token = h(header::AUTHORIZATION)
                .and_then(vitaltrail_core::auth::bearer)
                .and_then(|t| std::str::from_utf8(t).ok());
            match token.and_then(|t| acks.viewers.by_token(t)) {
                Some((name, wards)) => Actor::Viewer { name, wards },
                None => {
                    return refused(
                        r.status(),
                        "unauthenticated",
                        "missing or wrong bearer token: a nurse station's (<name>.token) or the operator's",
                    );
                }
            }
        }
    };
    match acks.handle.acknowledge(id, actor).await {
        Ok(event) => json_answer(
            200,
            serde_json::to_value(&event).unwrap_or(serde_json::Value::Null),
        ),
        Err(e) => {
            let mut body = serde_json::json!({ "error": e.to_string(), "code": e.code() });
            match &e {
                vitaltrail_alerts::AckRefusal::AlreadyAcknowledged { by, at_ms, .. } => {
                    body["by"] = serde_json::json!(by);
                    body["at_ms"] = serde_json::json!(at_ms);
                }
                vitaltrail_alerts::AckRefusal::Cleared { cleared_ms, .. } => {
                    body["cleared_ms"] = serde_json::json!(cleared_ms);
                }
                _ => {}
            }
            json_answer(e.status(), body)
        }
    }
}
