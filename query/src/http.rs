//! `POST /sql` over HTTP: one read-only statement per request.
//!
//! - **Authentication**: `Authorization: Bearer <token>`, the token in
//!   `<data>/keys/sql.token` ([`Token`]); anything else gets 401.
//! - **No cross-origin use**: a request whose `Origin` is not this server's
//!   own (`http://<Host>`) gets 403, so a web page in a nurse's or a
//!   researcher's browser cannot query the service on their behalf. No CORS
//!   headers are ever sent, so preflighted requests fail in the browser too.
//! - **Answer**: the body is the SQL text. The result streams as a JSON
//!   array of objects, CSV (`Accept: text/csv`) or an Arrow IPC stream
//!   (`Accept: application/vnd.apache.arrow.stream`). A refused statement
//!   (DDL, DML, `COPY`, `SET`) or invalid SQL gets 400 with `{"error": …}`.
//! - **Caps**: a result past [`QueryLimits`] is refused with 400 when that
//!   is known before the first byte is sent; past that point the response
//!   is cut off (the chunked body never terminates properly), so a client
//!   never mistakes a truncated result for a whole one.

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::{CappedStream, Error, Format, QueryEngine, QueryLimits, StreamEncoder};
use vitaltrail_core::auth::Token;

/// Arrow IPC stream media type.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// What `POST /sql` serves.
#[derive(Debug, Clone)]
pub struct SqlService {
    /// The data directory whose tables are queried.
    pub data_dir: PathBuf,
    /// The bearer token callers must present.
    pub token: Token,
    /// Caps on each query.
    pub limits: QueryLimits,
    /// Queries running at once; more get 503.
    pub concurrent: Arc<tokio::sync::Semaphore>,
}

/// Queries `POST /sql` runs at once by default.
pub const MAX_CONCURRENT_QUERIES: usize = 4;

/// The `/sql` route, and the FHIR search and read of Observations
/// (`GET /fhir/Observation?…`, `GET /fhir/Observation/<id>`), under the
/// same token.
pub fn router(svc: SqlService) -> axum::Router {
    axum::Router::new()
        .route("/sql", axum::routing::post(sql_handler))
        .route("/fhir/Observation", axum::routing::get(fhir_search))
        .route("/fhir/Observation/{id}", axum::routing::get(fhir_read))
        .with_state(Arc::new(svc))
}

/// FHIR's JSON media type.
pub const FHIR_JSON: &str = "application/fhir+json";

fn fhir_answer(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, FHIR_JSON)],
        format!("{body}\n"),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn fhir_refusal(status: StatusCode, code: &str, msg: &str) -> Response {
    fhir_answer(status, &crate::fhir::outcome(code, msg))
}

/// The checks of the FHIR routes: as `/sql`'s, answered as an
/// `OperationOutcome`; then a permit to run.
fn fhir_gate(
    svc: &SqlService,
    headers: &HeaderMap,
) -> Result<tokio::sync::OwnedSemaphorePermit, Box<Response>> {
    let h = |n: header::HeaderName| headers.get(n).map(|v| v.as_bytes());
    if let Err(r) =
        svc.token
            .authorize(h(header::ORIGIN), h(header::HOST), h(header::AUTHORIZATION))
    {
        let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN);
        return Err(Box::new(fhir_refusal(status, "security", r.message())));
    }
    svc.concurrent.clone().try_acquire_owned().map_err(|_| {
        Box::new(fhir_refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "too many queries at once; retry shortly",
        ))
    })
}

/// The server builds these queries: only a malformed request is the
/// caller's fault; a timeout or a cap is transient; anything else is the
/// server's, told without its internals (they are logged).
fn fhir_error(e: &Error) -> Response {
    match e {
        Error::Format(m) => fhir_refusal(StatusCode::BAD_REQUEST, "invalid", m),
        Error::Timeout(_) | Error::TooLarge { .. } | Error::TooBig(_) => fhir_refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "transient",
            "the search took too long or too much; retry, or narrow it (date, code, _count)",
        ),
        _ => {
            tracing::warn!(error = %e, "FHIR request failed");
            fhir_refusal(
                StatusCode::INTERNAL_SERVER_ERROR,
                "exception",
                "the search failed on the server (its log says why)",
            )
        }
    }
}

/// The host the links name: the request's `Host` if it is a plain
/// host[:port], else `localhost` (never a value that could change a
/// link's meaning).
fn link_host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']')
                })
        })
        .unwrap_or("localhost")
        .to_owned()
}

/// `GET /fhir/Observation?patient=P[&date=ge…][&code=…][&_count=N]`: a
/// `searchset` Bundle of the patient's Observations, by device time, with
/// a `next` link while there are more.
async fn fhir_search(
    State(svc): State<Arc<SqlService>>,
    headers: HeaderMap,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> Response {
    let _permit = match fhir_gate(&svc, &headers) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let query = query.unwrap_or_default();
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    let search = match crate::fhir::Search::from_pairs(
        pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())),
    ) {
        Ok(s) => s,
        Err(e) => return fhir_refusal(StatusCode::BAD_REQUEST, "invalid", &e.to_string()),
    };
    let page = match open(&svc).await {
        Ok(engine) => match engine.observations(&search).await {
            Ok(p) => p,
            Err(e) => return fhir_error(&e),
        },
        Err(e) => return fhir_error(&e),
    };
    let base = format!("http://{}/fhir/Observation", link_host(&headers));
    let url_of = |pairs: &mut dyn Iterator<Item = (&str, &str)>| {
        let mut s = url::form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k, v);
        }
        format!("{base}?{}", s.finish())
    };
    let self_url = url_of(&mut pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let next_url = page.next.as_ref().map(|c| {
        let c = c.to_string();
        url_of(
            &mut pairs
                .iter()
                .filter(|(k, _)| k != "_cursor")
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .chain(std::iter::once(("_cursor", c.as_str()))),
        )
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    fhir_answer(
        StatusCode::OK,
        &crate::fhir::searchset(
            &page,
            &self_url,
            next_url.as_deref(),
            &|id: &str| format!("{base}/{id}"),
            now,
        ),
    )
}

/// `GET /fhir/Observation/<id>`: one Observation, or 404.
async fn fhir_read(
    State(svc): State<Arc<SqlService>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let _permit = match fhir_gate(&svc, &headers) {
        Ok(p) => p,
        Err(r) => return *r,
    };
    let found = match open(&svc).await {
        Ok(engine) => engine.observation(&id).await,
        Err(e) => return fhir_error(&e),
    };
    match found {
        Ok(Some(o)) => fhir_answer(StatusCode::OK, &o),
        Ok(None) => fhir_refusal(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no Observation {id:?}"),
        ),
        Err(e) => fhir_error(&e),
    }
}

async fn open(svc: &SqlService) -> crate::Result<QueryEngine> {
    QueryEngine::open_with(&svc.data_dir, svc.limits).await
}

fn json_error(status: StatusCode, msg: &str) -> Response {
    let body = serde_json::json!({ "error": msg }).to_string();
    let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// The checks every authenticated endpoint makes ([`Token::authorize`]);
/// `Some` is the refusal to send.
pub fn refusal(headers: &HeaderMap, token: &Token) -> Option<Response> {
    let h = |n: header::HeaderName| headers.get(n).map(|v| v.as_bytes());
    token
        .authorize(h(header::ORIGIN), h(header::HOST), h(header::AUTHORIZATION))
        .err()
        .map(|r| {
            json_error(
                StatusCode::from_u16(r.status()).unwrap_or(StatusCode::FORBIDDEN),
                r.message(),
            )
        })
}

fn status_of(e: &Error) -> StatusCode {
    if e.is_caller_fault() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::INTERNAL_SERVER_ERROR
    }
}

async fn sql_handler(
    State(svc): State<Arc<SqlService>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    if let Some(r) = refusal(&headers, &svc.token) {
        return r;
    }
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let (format, ctype) = if accept.contains(ARROW_STREAM) {
        (Format::ArrowIpc, ARROW_STREAM)
    } else if accept.contains("text/csv") {
        (Format::Csv, "text/csv")
    } else {
        (Format::Json, "application/json")
    };
    let Ok(permit) = svc.concurrent.clone().try_acquire_owned() else {
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many queries at once; retry shortly",
        );
    };
    match start(&svc, &body, format, permit).await {
        Ok(stream) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, ctype)],
            Body::from_stream(stream),
        )
            .into_response(),
        Err(e) => json_error(status_of(&e), &e.to_string()),
    }
}

type Chunk = Result<Bytes, std::io::Error>;

/// Plan and start the query; the first batch is computed before the
/// response begins, so an error there still gets a proper status.
async fn start(
    svc: &SqlService,
    sql: &str,
    format: Format,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> crate::Result<impl futures::Stream<Item = Chunk> + Send + 'static> {
    let engine = QueryEngine::open_with(&svc.data_dir, svc.limits).await?;
    let mut rows = engine.stream(sql).await?;
    let (enc, head) = StreamEncoder::begin(format, &rows.schema())?;
    let first = rows.next().await.transpose()?;
    let mut head = head;
    let mut enc = enc;
    if let Some(b) = &first {
        head.extend(enc.batch(b)?);
    }
    struct St {
        _permit: tokio::sync::OwnedSemaphorePermit,
        _engine: QueryEngine,
        rows: CappedStream,
        enc: Option<StreamEncoder>,
        head: Option<Vec<u8>>,
    }
    let st = St {
        _permit: permit,
        _engine: engine,
        rows,
        enc: Some(enc),
        head: Some(head),
    };
    let cut = |e: Error| std::io::Error::other(e.to_string());
    Ok(futures::stream::unfold(st, move |mut st| async move {
        if let Some(h) = st.head.take() {
            return Some((Ok(Bytes::from(h)), st));
        }
        let enc = st.enc.as_mut()?;
        match st.rows.next().await {
            Some(Ok(b)) => {
                let r = enc.batch(&b).map(Bytes::from).map_err(cut);
                if r.is_err() {
                    st.enc = None;
                }
                Some((r, st))
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "SQL result cut off");
                st.enc = None;
                Some((Err(cut(e)), st))
            }
            None => {
                let enc = st.enc.take()?;
                Some((enc.finish().map(Bytes::from).map_err(cut), st))
            }
        }
    }))
}
