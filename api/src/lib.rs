//! # shoal-api
//!
//! The OpenAI-compatible HTTP API that any shoal node can serve, in front of a pipeline
//! [`Driver`]: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models`
//! (and `/v1/models/{model}`), `GET /health`, `GET /metrics` (Prometheus) and
//! `GET /openapi.json`, with OpenAI's request fields, response shapes, streaming
//! (server-sent events ending in `data: [DONE]`) and error envelope; and Anthropic's
//! Messages API (`POST /v1/messages`, `/v1/messages/count_tokens`) on the same machinery,
//! in Anthropic's shapes. Sampling fields a request leaves out get [`defaults`]; CORS is
//! answered for the configured origins only.
//!
//! What each request goes through:
//! 1. With API keys configured, `/v1/*` (and `/metrics`, unless `public_metrics`) needs
//!    `Authorization: Bearer KEY` or `x-api-key: KEY` (401 otherwise).
//! 2. The body must be JSON (415 otherwise) and is read under a size limit (413 beyond it)
//!    and a timeout (408); large bodies are parsed and tokenized on the blocking pool; every
//!    error, path decoding included, is in the error envelope. Unknown fields are
//!    ignored; a malformed body or a value out of range is a 400 with OpenAI's envelope
//!    `{"error": {"message", "type", "param", "code"}}`; a `model` other than the one served
//!    is a 404 ([`schema`]).
//! 3. Messages go through the model's chat template (completions take the prompt as is, text
//!    or token ids); a prompt longer than the context is a 400, never truncated.
//! 4. Admission ([`admission`]): at most `max_running` sessions at once; up to `max_waiting`
//!    requests queue; a full queue is a 429 with `Retry-After`.
//! 5. Each of the `n` choices is a session through the pipeline: the seed is the request's
//!    (or a fresh random one, so a failover replays the same tokens) plus the choice's index;
//!    ids become text incrementally, and `stop` strings end the text before them. Deadlines
//!    bound the wait for the first token (from arrival, queueing included) and between
//!    tokens (503 when missed).
//! 6. Streaming sends each piece of text as it is decided (text that might begin a stop string
//!    is held back, so the streamed text equals the non-streamed text); a failure mid-stream
//!    is one error event, then the stream closes; a client that disconnects cancels its
//!    sessions along the whole chain.
//!
//! Metrics follow vLLM's names with a `shoal_` prefix ([`metrics`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admission;
mod anthropic;
pub mod defaults;
mod error;
mod grammar;
mod handlers;
pub mod metrics;
mod openapi;
pub mod schema;
pub mod server;
pub mod text;
mod tokens;
mod tools;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
pub use error::ApiError;
use shoal_coordinator_free_router::driver::Driver;
use shoal_model_shards::Model;
use shoal_model_shards::chat_template::ChatTemplate;
use shoal_model_shards::tokenizer::Tokenizer;
use tower_http::cors::{AllowHeaders, AllowOrigin, CorsLayer};

use crate::admission::Admission;
use crate::defaults::SamplingDefaults;
use crate::metrics::Metrics;
use crate::tokens::TokenText;

/// The model as the API presents it.
pub struct ServedModel {
    /// Its name in `/v1/models` and responses.
    pub name: String,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its chat template (chat completions need one).
    pub chat_template: Option<ChatTemplate>,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    /// Its context: prompt plus generated tokens.
    pub max_positions: usize,
    /// The sampling defaults the model recommends ([`SamplingDefaults::of_model`]); empty
    /// unless the server reads them.
    pub sampling: SamplingDefaults,
}

impl ServedModel {
    /// Reads what the API needs from `model`, named `name`. Generation ends at the
    /// tokenizer's end-of-sequence ids and those of the model's config.
    pub fn of(model: &Model, name: impl Into<String>) -> Result<Self, shoal_model_shards::Error> {
        let tokenizer = model.tokenizer()?;
        let mut stop_ids = tokenizer.eos_ids().to_vec();
        for id in model.config_eos_ids() {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Ok(Self {
            name: name.into(),
            chat_template: model.chat_template()?,
            tokenizer,
            stop_ids,
            max_positions: model.spec().max_position_embeddings,
            sampling: SamplingDefaults::default(),
        })
    }
}

/// Limits and policies of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Keys accepted on `/v1/*` (`Authorization: Bearer KEY`); empty: no key needed.
    pub api_keys: Vec<String>,
    /// Most sessions generating at once.
    pub max_running: usize,
    /// Most requests waiting for admission (429 beyond).
    pub max_waiting: usize,
    /// Longest wait from a request's arrival to its first token (queueing included).
    pub first_token_timeout: Duration,
    /// Longest wait between two tokens of a session.
    pub token_timeout: Duration,
    /// Most choices per request (`n`).
    pub max_n: usize,
    /// Caps the context below the model's (vLLM's `--max-model-len`).
    pub max_model_len: Option<usize>,
    /// The operator's sampling defaults (`--default-temperature`, ...): they win over the
    /// model's recommendations, a request's own fields win over them.
    pub sampling: SamplingDefaults,
    /// Origins whose browser pages may call the API (CORS); `*` allows any; empty: no CORS
    /// headers, browsers refuse cross-origin calls.
    pub cors_origins: Vec<String>,
    /// Serve `/metrics` without an API key even when keys are configured.
    pub public_metrics: bool,
    /// Longest wait for a request's body once its headers arrived (408 beyond).
    pub body_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            api_keys: Vec::new(),
            max_running: 16,
            max_waiting: 64,
            first_token_timeout: Duration::from_secs(120),
            token_timeout: Duration::from_secs(30),
            max_n: 8,
            max_model_len: None,
            sampling: SamplingDefaults::default(),
            cors_origins: Vec::new(),
            public_metrics: false,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// What the API serves and how.
pub struct ApiState {
    /// The pipeline driver that generates.
    pub driver: Arc<Driver>,
    /// The model.
    pub model: ServedModel,
    /// Limits and policies.
    pub config: ApiConfig,
    admission: Admission,
    metrics: Metrics,
    token_text: TokenText,
    sampling: SamplingDefaults,
    grammars: grammar::Grammars,
}

impl ApiState {
    /// The API of `model` in front of `driver`.
    pub fn new(
        driver: Arc<Driver>,
        model: ServedModel,
        config: ApiConfig,
    ) -> Result<Self, prometheus::Error> {
        Ok(Self {
            admission: Admission::new(config.max_running, config.max_waiting),
            metrics: Metrics::new(&model.name)?,
            token_text: TokenText::new(&model.tokenizer),
            grammars: grammar::Grammars::new(&model.tokenizer, driver.vocab_size() as usize, &model.stop_ids),
            sampling: config.sampling.or(model.sampling).or(SamplingDefaults::SHOAL),
            driver,
            model,
            config,
        })
    }

    /// The context a request may use: the model's, capped by `max_model_len`.
    pub fn max_positions(&self) -> usize {
        self.config.max_model_len.map_or(self.model.max_positions, |m| m.min(self.model.max_positions))
    }

    /// Most choices per request.
    pub fn max_n(&self) -> usize {
        self.config.max_n.min(self.config.max_running).max(1)
    }

    /// What a request gets for each sampling field it leaves out: the operator's default,
    /// else the model's recommendation, else [`SamplingDefaults::SHOAL`].
    pub fn sampling_defaults(&self) -> &SamplingDefaults {
        &self.sampling
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Admission state.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }
}

/// The axum router of the API.
pub fn router(state: Arc<ApiState>) -> Router {
    let limit = state.config.max_body_bytes;
    let mut keyed = Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models))
        .route("/v1/models/{model}", get(handlers::model))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens));
    let mut open =
        Router::new().route("/health", get(handlers::health)).route("/openapi.json", get(handlers::openapi));
    // The metrics tell load and model names: behind the key unless the operator opens them.
    if state.config.public_metrics {
        open = open.route("/metrics", get(handlers::metrics));
    } else {
        keyed = keyed.route("/metrics", get(handlers::metrics));
    }
    // Layers run outside in: the key first, then the body is read (a body is read only for
    // a caller with a key).
    let keyed = keyed
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key));
    let cors = cors(&state.config.cors_origins);
    let app = Router::new()
        .merge(keyed)
        .merge(open)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state);
    match cors {
        Some(layer) => app.layer(layer),
        None => app,
    }
}

/// The CORS layer for `origins` (none when empty): preflights are answered before keys are
/// checked; an origin not in the list gets no `Access-Control-Allow-Origin`, so the browser
/// refuses the call. Origins that are not valid header values are skipped (the CLI checks
/// them first).
fn cors(origins: &[String]) -> Option<CorsLayer> {
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers(AllowHeaders::mirror_request())
            .expose_headers([header::RETRY_AFTER])
            .max_age(Duration::from_secs(600)),
    )
}

/// Compares in time independent of where the first difference is.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether a `Content-Type` value names JSON (`application/json`, `application/*+json`).
fn is_json(content_type: &str) -> bool {
    let mime = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Reads a request's body before its handler runs: a `Content-Type` other than JSON is a
/// 415, a body beyond the size limit a 413, one that does not arrive within the body timeout
/// a 408 (all in the error format of the endpoint's dialect). A request without a
/// `Content-Type` is read as JSON.
async fn read_body(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let anthropic = req.uri().path().starts_with("/v1/messages");
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let text = String::from_utf8_lossy(ct.as_bytes()).into_owned();
        if !is_json(&text) {
            return ApiError::unsupported_media_type(&text).into_response_for(anthropic);
        }
    }
    let limit = state.config.max_body_bytes;
    let (parts, body) = req.into_parts();
    let declared =
        parts.headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::too_large(limit).into_response_for(anthropic);
    }
    let timeout = state.config.body_timeout;
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => {
            let e = e.into_inner();
            let err = if e.is::<http_body_util::LengthLimitError>() {
                ApiError::too_large(limit)
            } else {
                ApiError::invalid(format!("reading the request body: {e}"), None)
            };
            return err.into_response_for(anthropic);
        }
        Err(_) => return ApiError::body_timeout(timeout).into_response_for(anthropic),
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

async fn require_key(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    if state.config.api_keys.is_empty() {
        return next.run(req).await;
    }
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Anthropic's clients send the key as `x-api-key`.
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim);
    let known = |k: &str| state.config.api_keys.iter().any(|key| same_key(key.as_bytes(), k.as_bytes()));
    if bearer.is_some_and(known) || x_api_key.is_some_and(known) {
        return next.run(req).await;
    }
    if req.uri().path().starts_with("/v1/messages") {
        let mut e = ApiError::unauthorized();
        e.message = "invalid or missing API key: send `x-api-key: KEY`".into();
        e.into_anthropic_response()
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Pings every known peer every `every` for the mesh metrics (`shoal_hop_latency_seconds`,
/// `shoal_live_peers`); keeps the driver's view of loads and draining peers fresh. Runs until
/// dropped.
pub async fn watch_mesh(state: Arc<ApiState>, every: Duration) {
    loop {
        let answered = state.driver.refresh().await;
        for (_, rtt) in &answered {
            state.metrics.hop_latency.observe(rtt.as_secs_f64() / 2.0);
        }
        state.metrics.live_peers.set(answered.len() as i64);
        tokio::time::sleep(every).await;
    }
}
