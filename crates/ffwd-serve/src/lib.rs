//! `ffwd serve`: an HTTP inference server over the ffwd library (axum on tokio).
//!
//! Routes: `POST /v1/predict` (classifiers and Forward-Forward nets; JSON rows or a raw
//! little-endian f32 body), `POST /v1/completions` (language models; the OpenAI-compatible
//! subset, with server-sent-event streaming), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (Prometheus text). Classifier requests are batched dynamically ([`batcher`]); LM streams
//! are decoded together, one batched step for every active sequence ([`decode`]).
//!
//! The server is stateless between requests: scale out with replicas behind any load
//! balancer.

#![warn(missing_docs)]

pub mod batcher;
pub mod decode;
pub mod metrics;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use ffwd::checkpoint::{format_of, FF_FORMAT, LM_FORMAT};
use ffwd::kernels::Precision;
use ffwd::models::Classifier;
use ffwd::train::forward_forward::FfNet;
use ffwd::train::lm::LmCheckpoint;

use crate::metrics::Metrics;

/// How the server runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Models by name (`NAME=PATH`; a bare path is named by its file stem).
    pub models: Vec<(String, PathBuf)>,
    /// Rows per classifier call / sequences per LM step at most (1 = no batching).
    pub max_batch: usize,
    /// Requests in flight at most; more are answered 429 with `Retry-After`.
    pub max_concurrent: usize,
    /// Largest `max_tokens` a completion may ask for.
    pub max_tokens: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Load classifiers' layers and LMs' FFN blocks with bf16 weight matrices (dense, ufff,
    /// fff leaves, moe/smoe/moefied experts).
    pub bf16: bool,
    /// Print one line per request on stderr.
    pub log_requests: bool,
    /// Compute threads of each model's pool (0 = one per core).
    pub threads: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            models: Vec::new(),
            max_batch: 64,
            max_concurrent: 512,
            max_tokens: 4096,
            body_limit: 16 << 20,
            bf16: false,
            log_requests: true,
            threads: 0,
        }
    }
}

/// Errors of starting the server (loading a model, binding the address).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A model failed to load.
    #[error("model `{name}`: {source}")]
    Model {
        /// Its name.
        name: String,
        /// Why.
        source: ffwd::Error,
    },
    /// A configuration mistake (no model, duplicate names).
    #[error("{0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A loaded model and its queue.
enum Served {
    /// Classifier or Forward-Forward net behind a batch worker.
    Batch { queue: Sender<batcher::Job>, in_features: usize, classes: usize, kind: String, path: PathBuf },
    /// Language model behind a decoding worker.
    Lm { queue: Sender<decode::Job>, ck: Arc<LmCheckpoint>, path: PathBuf },
}

/// Shared state of the handlers.
pub struct AppState {
    models: BTreeMap<String, Served>,
    metrics: Arc<Metrics>,
    limit: Arc<Semaphore>,
    opts: ServeOptions,
    next_id: std::sync::atomic::AtomicU64,
}

/// Loads every model and starts its worker. Errors name the model.
pub fn load(opts: &ServeOptions) -> Result<Arc<AppState>, ServeError> {
    if opts.models.is_empty() {
        return Err(ServeError::Config("no model to serve (give --model PATH or --model NAME=PATH)".into()));
    }
    let metrics = Arc::new(Metrics::default());
    let mut models = BTreeMap::new();
    for (name, path) in &opts.models {
        if models.contains_key(name) {
            return Err(ServeError::Config(format!("two models are named `{name}` (use --model NAME=PATH)")));
        }
        let err = |source| ServeError::Model { name: name.clone(), source };
        let format = format_of(path).map_err(err)?;
        let served = if format == LM_FORMAT {
            let mut ck = LmCheckpoint::load(path).map_err(err)?;
            if opts.bf16 {
                ck.lm.set_precision(Precision::Bf16).map_err(err)?;
            }
            let ck = Arc::new(ck);
            let queue = decode::spawn(name.clone(), ck.clone(), opts.max_batch, opts.threads, metrics.clone())?;
            Served::Lm { queue, ck, path: path.clone() }
        } else {
            let model = if format == FF_FORMAT {
                batcher::BatchModel::Ff(Box::new(FfNet::load(path).map_err(err)?))
            } else {
                let mut m = Classifier::load(path).map_err(err)?;
                if opts.bf16 {
                    m.set_precision(Precision::Bf16).map_err(err)?;
                }
                batcher::BatchModel::Classifier(Box::new(m))
            };
            let (in_features, classes, kind) = (model.in_features(), model.classes(), model.kind());
            let queue = batcher::spawn(name.clone(), model, opts.max_batch, opts.threads, metrics.clone())?;
            Served::Batch { queue, in_features, classes, kind, path: path.clone() }
        };
        models.insert(name.clone(), served);
    }
    Ok(Arc::new(AppState { models, metrics, limit: Arc::new(Semaphore::new(opts.max_concurrent.max(1))), opts: opts.clone(), next_id: 0.into() }))
}

/// The routes over loaded models.
pub fn router(state: Arc<AppState>) -> Router {
    let body_limit = state.opts.body_limit;
    Router::new()
        .route("/v1/predict", post(predict))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn_with_state(state.clone(), admit))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| {
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error: the request handler panicked")
        }))
        .with_state(state)
}

/// Serves `state` on `addr` until `shutdown` resolves, then stops accepting, lets in-flight
/// requests (streams included) finish, and returns. `ready` receives the bound address.
pub async fn run(
    state: Arc<AppState>,
    addr: SocketAddr,
    ready: impl FnOnce(SocketAddr),
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    ready(listener.local_addr()?);
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

/// A compute pool of `threads` threads (0 = one per core) for one model's worker.
fn compute_pool(name: &str, threads: usize) -> std::io::Result<rayon::ThreadPool> {
    let n = if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let name = name.to_string();
    rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(move |i| format!("ffwd-{name}-{i}")).build().map_err(std::io::Error::other)
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// A JSON error `{"error": {"message", "type", "param"}}` (OpenAI's shape; `param` names the
/// field at fault).
fn error(status: StatusCode, param: &str, message: impl Into<String>) -> Response {
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    (status, Json(json!({"error": {"message": message.into(), "type": kind, "param": param}}))).into_response()
}

/// Concurrency limit (429 beyond it), request log line and metrics.
async fn admit(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let t0 = Instant::now();
    let permit = if path.starts_with("/v1/") { Some(state.limit.clone().try_acquire_owned()) } else { None };
    let resp = match permit {
        Some(Err(_)) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "", format!("more than {} requests in flight; retry shortly", state.opts.max_concurrent));
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        Some(Ok(permit)) => {
            // held until the handler returns, or by a stream until it ends
            let mut req = req;
            req.extensions_mut().insert(Arc::new(permit));
            next.run(req).await
        }
        None => next.run(req).await,
    };
    let secs = t0.elapsed().as_secs_f64();
    let route = match path.as_str() {
        "/v1/predict" | "/v1/completions" | "/v1/models" | "/health" | "/metrics" => path.as_str(),
        _ => "other",
    };
    state.metrics.request(route, resp.status().as_u16(), secs);
    if state.opts.log_requests {
        eprintln!("{method} {path} {} {:.3}ms", resp.status().as_u16(), secs * 1e3);
    }
    resp
}

async fn health() -> Json<Value> {
    // the listener is bound only after every model is loaded, so an answer means ready
    Json(json!({"status": "ok"}))
}

async fn metrics_text(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|(name, m)| match m {
            Served::Batch { in_features, classes, kind, path, .. } => {
                json!({"id": name, "object": "model", "owned_by": "ffwd", "kind": kind, "in_features": in_features, "classes": classes, "path": path})
            }
            Served::Lm { ck, path, .. } => json!({"id": name, "object": "model", "owned_by": "ffwd", "kind": "lm", "ffn": ck.lm.config().ffn.kind(),
                "context": ck.lm.config().context, "vocab": ck.tokenizer.chars().iter().collect::<String>(), "path": path}),
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

/// The model a request names (or the only one served); the error is the answer to send.
#[allow(clippy::result_large_err)]
fn pick<'a>(state: &'a AppState, name: Option<&str>) -> Result<(&'a str, &'a Served), Response> {
    match name {
        Some(n) => state.models.get_key_value(n).map(|(k, v)| (k.as_str(), v)).ok_or_else(|| {
            let names: Vec<&str> = state.models.keys().map(String::as_str).collect();
            error(StatusCode::NOT_FOUND, "model", format!("unknown model `{n}` (serving: {})", names.join(", ")))
        }),
        None if state.models.len() == 1 => Ok(state.models.iter().next().map(|(k, v)| (k.as_str(), v)).expect("one model")),
        None => Err(error(StatusCode::BAD_REQUEST, "model", "`model` is required when several models are served")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PredictRequest {
    model: Option<String>,
    inputs: Vec<Vec<f32>>,
}

/// `POST /v1/predict`: JSON `{"model", "inputs": [[…], …]}`, or a raw body of little-endian
/// f32 rows (`Content-Type: application/octet-stream`, `X-Width: features`, optional
/// `X-Model`).
async fn predict(State(state): State<Arc<AppState>>, headers: HeaderMap, body: Bytes) -> Response {
    let raw = headers.get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/octet-stream"));
    let (name, x, width_claim) = if raw {
        let width = match headers.get("x-width").and_then(|v| v.to_str().ok()).map(str::parse::<usize>) {
            Some(Ok(w)) if w > 0 => w,
            _ => return error(StatusCode::BAD_REQUEST, "X-Width", "a raw f32 body needs an X-Width header: the number of features per row"),
        };
        if !body.len().is_multiple_of(4) || !(body.len() / 4).is_multiple_of(width) || body.is_empty() {
            return error(StatusCode::BAD_REQUEST, "body", format!("a raw body of {} bytes is not whole rows of {width} little-endian f32 values", body.len()));
        }
        let x: Vec<f32> = body.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (headers.get("x-model").and_then(|v| v.to_str().ok()).map(str::to_string), x, Some(width))
    } else {
        let req: PredictRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(StatusCode::BAD_REQUEST, "body", format!("malformed request: {e}")),
        };
        if req.inputs.is_empty() {
            return error(StatusCode::BAD_REQUEST, "inputs", "`inputs` is empty");
        }
        let w = req.inputs[0].len();
        if let Some((i, r)) = req.inputs.iter().enumerate().find(|(_, r)| r.len() != w) {
            return error(StatusCode::BAD_REQUEST, "inputs", format!("inputs[{i}] has {} values, inputs[0] has {w}", r.len()));
        }
        (req.model, req.inputs.concat(), Some(w))
    };
    let (name, served) = match pick(&state, name.as_deref()) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Served::Batch { queue, in_features, classes, .. } = served else {
        return error(StatusCode::BAD_REQUEST, "model", format!("`{name}` is a language model: use /v1/completions"));
    };
    if width_claim != Some(*in_features) {
        return error(StatusCode::BAD_REQUEST, "inputs", format!("rows have {} features, model `{name}` expects {in_features}", width_claim.unwrap_or(0)));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return error(StatusCode::BAD_REQUEST, "inputs", format!("non-finite value at row {}, column {}", i / in_features, i % in_features));
    }
    let rows = x.len() / in_features;
    let (tx, rx) = oneshot::channel();
    if queue.send(batcher::Job { x, rows, reply: tx }).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "model", "the model's worker has stopped");
    }
    match rx.await {
        Ok(Ok(p)) => {
            let probabilities: Option<Vec<&[f32]>> = p.probabilities.as_ref().map(|v| v.chunks(*classes).collect());
            Json(json!({"model": name, "classes": p.classes, "probabilities": probabilities})).into_response()
        }
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, "", e),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "", "the model's worker dropped the request"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompletionRequest {
    model: Option<String>,
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default = "default_temperature")]
    temperature: f32,
    #[serde(default)]
    top_k: usize,
    #[serde(default)]
    seed: u64,
    #[serde(default)]
    stream: bool,
}

fn default_max_tokens() -> usize {
    16
}

fn default_temperature() -> f32 {
    1.0
}

/// `POST /v1/completions`: the OpenAI-compatible subset (`prompt`, `max_tokens`,
/// `temperature`, `top_k`, `seed`, `stream`).
async fn completions(State(state): State<Arc<AppState>>, permit: Option<Extension<Arc<OwnedSemaphorePermit>>>, body: Bytes) -> Response {
    let req: CompletionRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "body", format!("malformed request: {e}")),
    };
    let (name, served) = match pick(&state, req.model.as_deref()) {
        Ok(m) => m,
        Err(r) => return r,
    };
    let Served::Lm { queue, ck, .. } = served else {
        return error(StatusCode::BAD_REQUEST, "model", format!("`{name}` is a classifier: use /v1/predict"));
    };
    if req.max_tokens > state.opts.max_tokens {
        return error(
            StatusCode::BAD_REQUEST,
            "max_tokens",
            format!("max_tokens {} is more than this server's limit of {}", req.max_tokens, state.opts.max_tokens),
        );
    }
    if !(req.temperature.is_finite() && req.temperature >= 0.0) {
        return error(StatusCode::BAD_REQUEST, "temperature", format!("temperature must be a finite number ≥ 0, got {}", req.temperature));
    }
    if req.prompt.is_empty() {
        return error(StatusCode::BAD_REQUEST, "prompt", "`prompt` is empty");
    }
    let prompt = match ck.tokenizer.encode(&req.prompt) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "prompt", e.to_string()),
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let job = decode::Job { prompt: prompt.clone(), max_tokens: req.max_tokens, temperature: req.temperature, top_k: req.top_k, seed: req.seed, out: tx };
    if queue.send(job).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "model", "the model's worker has stopped");
    }
    let id = format!("cmpl-{}", state.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let created = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let model = name.to_string();
    if req.stream {
        // the stream keeps the request's concurrency permit until it ends
        let permit = permit.map(|Extension(p)| p);
        let (etx, erx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
        tokio::spawn(async move {
            let _permit = permit;
            let chunk = |text: &str, finish: Option<&str>| {
                let v = json!({"id": id, "object": "text_completion", "created": created, "model": model, "choices": [{"text": text, "index": 0, "finish_reason": finish}]});
                Ok(Event::default().data(v.to_string()))
            };
            while let Some(t) = rx.recv().await {
                let (events, last) = match t {
                    decode::Token::Text(s) => (vec![chunk(&s, None)], false),
                    decode::Token::Done => (vec![chunk("", Some("length")), Ok(Event::default().data("[DONE]"))], true),
                    decode::Token::Failed(e) => {
                        (vec![Ok(Event::default().data(json!({"error": {"message": e, "type": "server_error", "param": null}}).to_string()))], true)
                    }
                };
                for e in events {
                    // a closed channel means the client left: dropping `rx` tells the decoder
                    if etx.send(e).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
            }
        });
        return Sse::new(tokio_stream::wrappers::ReceiverStream::new(erx)).into_response();
    }
    let mut text = String::new();
    let mut completion_tokens = 0;
    while let Some(t) = rx.recv().await {
        match t {
            decode::Token::Text(s) => {
                text.push_str(&s);
                completion_tokens += 1;
            }
            decode::Token::Done => break,
            decode::Token::Failed(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, "", e),
        }
    }
    Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": text, "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": prompt.len(), "completion_tokens": completion_tokens, "total_tokens": prompt.len() + completion_tokens},
    }))
    .into_response()
}
