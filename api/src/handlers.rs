//! The endpoints, and how one request becomes `n` sessions through the pipeline.
//!
//! A completion request is validated ([`crate::schema`]), admitted ([`crate::admission`]),
//! then each of its `n` choices runs as its own task (owned by a `JoinSet`, so a request that
//! goes away aborts them all, and each aborted generation closes its session along the
//! chain). Choice `i` samples with `seed + i`. A watchdog ends a choice whose first token
//! (counted from the request's arrival) or next token does not come within its deadline.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use shoal_coordinator_free_router::constraint::Constraint;
use shoal_coordinator_free_router::driver::Request;
use shoal_model_shards::generate::{FinishReason, Flow};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::schema::{ChatBody, CompletionBody, Job, Kind, parse};
use crate::text::TextAssembler;
use crate::tools::{Call, Syntax, ToolStream};
use crate::{ApiError, ApiState, anthropic};
use shoal_model_shards::chat_template::ChatMessage;

type Tx = mpsc::UnboundedSender<Result<Event, Infallible>>;

pub(crate) async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint", None, "not_found")
}

pub(crate) async fn method_not_allowed() -> ApiError {
    let mut e = ApiError::invalid("method not allowed on this endpoint", None);
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.code = Some("method_not_allowed");
    e
}

fn model_object(name: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": "shoal"})
}

pub(crate) async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({"object": "list", "data": [model_object(&state.model.name)]}))
}

pub(crate) async fn model(
    State(state): State<Arc<ApiState>>,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let id = match id {
        Ok(Path(id)) => id,
        Err(e) => {
            return ApiError::invalid(format!("invalid path: {}", e.body_text()), Some("model"))
                .into_response();
        }
    };
    if id == state.model.name {
        Json(model_object(&id)).into_response()
    } else {
        ApiError::not_found(format!("the model `{id}` does not exist"), Some("model"), "model_not_found")
            .into_response()
    }
}

pub(crate) async fn health(State(state): State<Arc<ApiState>>) -> Response {
    match state.driver.plan_route() {
        Ok(route) => {
            (StatusCode::OK, Json(json!({"status": "ok", "route_hops": route.len()}))).into_response()
        }
        Err(e) => ApiError::from(e).into_response(),
    }
}

pub(crate) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let m = &state.metrics;
    m.running.set(state.admission.running() as i64);
    m.waiting.set(state.admission.waiting() as i64);
    m.spot_checked(state.driver.spot_check_counts());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()).into_response()
}

pub(crate) async fn openapi(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(crate::openapi::document(&state.model.name, state.max_n()))
}

pub(crate) async fn chat_completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let job = prepare(&state, body, |state, body| {
        let mut body: ChatBody = parse(body)?;
        let template =
            state.model.chat_template.as_ref().ok_or_else(|| {
                ApiError::invalid("this model has no chat template; use /v1/completions", None)
            })?;
        let tools = body.tool_request()?;
        let native = template.takes_tools();
        let mut messages = body.chat_messages(native)?;
        let text = match &tools {
            Some(t) if native => template.render_with_tools(&messages, true, Some(&t.openai_tools())),
            Some(t) => {
                // The fallback: the tools in a system message of their own, first.
                match messages.first_mut().filter(|m| m.role == "system") {
                    Some(system) => system.content = format!("{}\n\n{}", system.content, t.fallback_prompt()),
                    None => messages.insert(0, ChatMessage::new("system", t.fallback_prompt())),
                }
                template.render(&messages, true)
            }
            None => template.render(&messages, true),
        }
        .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let tools = tools.map(|t| (t, Syntax::of_template(template.source(), native)));
        let prompt = state
            .model
            .tokenizer
            .encode(&text, false)
            .map_err(|e| ApiError::invalid(e.to_string(), Some("messages")))?;
        let logprobs = body.logprobs()?;
        state.job(Kind::Chat, prompt, body.common, logprobs, "messages", tools)
    })
    .await;
    match job {
        Ok(job) => serve(state, job, arrived).await,
        Err(e) => e.into_response(),
    }
}

pub(crate) async fn completions(
    State(state): State<Arc<ApiState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let job = prepare(&state, body, |state, body| {
        let mut body: CompletionBody = parse(body)?;
        let prompt = body.prompt_ids(state)?;
        let logprobs = body.logprobs()?;
        state.job(Kind::Completion, prompt, body.common, logprobs, "prompt", None)
    })
    .await;
    match job {
        Ok(job) => serve(state, job, arrived).await,
        Err(e) => e.into_response(),
    }
}

/// Bodies larger than this are parsed, templated and tokenized on the blocking pool.
const OFF_RUNTIME_BYTES: usize = 16 * 1024;

/// Turns a request body into what the handler needs (parsing, chat template, tokenizer):
/// inline for small bodies, on the blocking pool for large ones, so a megabyte prompt does
/// not hold one of the async runtime's few threads.
pub(crate) async fn prepare<T: Send + 'static>(
    state: &Arc<ApiState>,
    body: Result<Bytes, BytesRejection>,
    f: impl FnOnce(&ApiState, Result<Bytes, BytesRejection>) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    if !body.as_ref().is_ok_and(|b| b.len() > OFF_RUNTIME_BYTES) {
        return f(state, body);
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || f(&state, body))
        .await
        .unwrap_or_else(|e| Err(ApiError::internal(format!("preparing the request failed: {e}"))))
}

/// One generated token's log-probabilities.
#[derive(Debug, Clone)]
struct TokenLp {
    id: u32,
    logprob: f32,
    top: Vec<(u32, f32)>,
}

/// What one choice produced.
struct ChoiceResult {
    index: usize,
    text: String,
    finish: &'static str,
    /// The stop string that ended the text, if one did.
    stop_sequence: Option<String>,
    tokens: usize,
    logprobs: Vec<TokenLp>,
    /// The tool calls read from the text (then `text` is the content outside them).
    calls: Vec<Call>,
}

/// The identity shared by every chunk of one response.
struct Meta {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// Chat logprobs of `lps`: `{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal"}`.
fn chat_logprobs(state: &ApiState, lps: &[TokenLp]) -> Value {
    let entry = |id: u32, lp: f32| {
        let (token, bytes) = state.token_text.text(id);
        json!({"token": token, "logprob": lp, "bytes": bytes})
    };
    let content: Vec<Value> = lps
        .iter()
        .map(|t| {
            let mut e = entry(t.id, t.logprob);
            e["top_logprobs"] = t.top.iter().map(|&(id, lp)| entry(id, lp)).collect();
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

/// Completions logprobs of `lps`: `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`,
/// offsets counted in characters from `offset` (where these tokens' text begins).
fn completion_logprobs(state: &ApiState, lps: &[TokenLp], offset: &mut usize) -> Value {
    let mut tokens = Vec::with_capacity(lps.len());
    let mut token_logprobs = Vec::with_capacity(lps.len());
    let mut top = Vec::with_capacity(lps.len());
    let mut text_offset = Vec::with_capacity(lps.len());
    for t in lps {
        let (s, _) = state.token_text.text(t.id);
        text_offset.push(*offset);
        *offset += s.chars().count();
        tokens.push(s);
        token_logprobs.push(t.logprob);
        let alts: serde_json::Map<String, Value> =
            t.top.iter().map(|&(id, lp)| (state.token_text.text(id).0, json!(lp))).collect();
        top.push(Value::Object(alts));
    }
    json!({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": text_offset})
}

/// One streamed chunk of choice `index`.
fn chunk(
    meta: &Meta,
    index: usize,
    delta: Option<&str>,
    finish: Option<&str>,
    role: bool,
    logprobs: Value,
) -> Value {
    match meta.kind {
        Kind::Chat => {
            let mut d = serde_json::Map::new();
            if role {
                d.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = delta {
                d.insert("content".into(), json!(t));
            }
            json!({"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model,
                   "choices": [{"index": index, "delta": d, "logprobs": logprobs, "finish_reason": finish}]})
        }
        Kind::Completion => json!({"id": meta.id, "object": "text_completion", "created": meta.created,
            "model": meta.model,
            "choices": [{"index": index, "text": delta.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish}]}),
        Kind::Messages => anthropic::text_delta(delta.unwrap_or("")),
    }
}

/// Sends one server-sent event. Anthropic's events (objects with a `type`) are named by
/// their type, as Anthropic names them; OpenAI's chunks have no name.
fn send(tx: &Tx, v: &Value) -> bool {
    let mut event = Event::default();
    if let Some(name) = v.get("type").and_then(Value::as_str) {
        // `event:` before `data:`, as Anthropic writes them.
        event = event.event(name);
    }
    tx.send(Ok(event.data(v.to_string()))).is_ok()
}

const NO_TOKEN: u64 = u64::MAX;

/// Runs choice `index` of `job`; with `stream`, sends its chunks as they are decided.
/// The text of `ids` as a fresh assembler holds it (after tokens were withdrawn).
fn assembled(state: &ApiState, stops: &[String], ids: &[u32]) -> TextAssembler {
    let mut text = TextAssembler::new(&state.model.tokenizer, stops.to_vec());
    for &id in ids {
        let _ = text.push(id);
    }
    text
}

async fn run_choice(
    state: Arc<ApiState>,
    job: Arc<Job>,
    index: usize,
    arrived: Instant,
    stream: Option<(Tx, Arc<Meta>)>,
) -> Result<ChoiceResult, ApiError> {
    let mut params = job.params.clone();
    params.seed = params.seed.wrapping_add(index as u64);
    let request = Request {
        prompt: job.prompt.clone(),
        params,
        max_tokens: job.max_tokens,
        stop_ids: if job.ignore_eos { Vec::new() } else { state.model.stop_ids.clone() },
        top_logprobs: job.logprobs.unwrap_or(0),
        constraint: job
            .grammar
            .as_ref()
            .map(|g| Constraint::new(g.start(state.metrics.grammar_mask.clone()))),
    };
    let m = &state.metrics;
    let mut text = TextAssembler::new(&state.model.tokenizer, job.stops.clone());
    let mut lps = Vec::new();
    let (mut stopped, mut gone, mut last_at) = (false, false, None::<Instant>);
    // The ids taken so far, and whether a stream was cut because some were withdrawn.
    let (mut ids, mut withdrawn) = (Vec::<u32>::new(), false);
    let mut offset = 0usize;
    let mut tool_stream = job.tools.map(|(syntax, constrained)| ToolStream::new(syntax, constrained));
    // Milliseconds from arrival to the latest token, for the watchdog.
    let latest = AtomicU64::new(NO_TOKEN);
    if let Some((tx, meta)) = &stream
        && meta.kind == Kind::Chat
    {
        gone = !send(tx, &chunk(meta, index, Some(""), None, true, Value::Null));
    }
    if gone {
        return Err(client_gone());
    }
    let generation = state.driver.generate(&request, |ev| {
        let now = Instant::now();
        match last_at {
            None if index == 0 => m.ttft.observe(now.duration_since(arrived).as_secs_f64()),
            None => {}
            Some(t) => m.itl.observe(now.duration_since(t).as_secs_f64()),
        }
        last_at = Some(now);
        latest.store(now.duration_since(arrived).as_millis() as u64, Ordering::Relaxed);
        if ev.index < ids.len() {
            // A spot-check caught a worker lying: the tokens from this index on are withdrawn
            // (`TokenEvent`). Text already streamed cannot be taken back: the stream ends with
            // an error. A whole response is assembled again without them.
            if stream.is_some() {
                withdrawn = true;
                return Flow::Stop;
            }
            ids.truncate(ev.index);
            lps.truncate(ev.index);
            text = assembled(&state, &job.stops, &ids);
        }
        ids.push(ev.token);
        let (mut piece, hit) = text.push(ev.token);
        stopped |= hit;
        if let (Some(ts), Some(_)) = (tool_stream.as_mut(), &stream) {
            piece = ts.push(&piece);
        }
        let lp = job.logprobs.map(|_| TokenLp {
            id: ev.token,
            logprob: ev.logprob,
            top: ev.top_logprobs.to_vec(),
        });
        if let Some((tx, meta)) = &stream {
            if !piece.is_empty() || lp.is_some() {
                let lpv = match (&lp, meta.kind) {
                    (None, _) | (Some(_), Kind::Messages) => Value::Null,
                    (Some(l), Kind::Chat) => chat_logprobs(&state, std::slice::from_ref(l)),
                    (Some(l), Kind::Completion) => {
                        completion_logprobs(&state, std::slice::from_ref(l), &mut offset)
                    }
                };
                if !send(tx, &chunk(meta, index, Some(&piece), None, false, lpv)) {
                    gone = true;
                    return Flow::Stop;
                }
            }
        } else if let Some(l) = lp {
            lps.push(l);
        }
        if hit { Flow::Stop } else { Flow::Continue }
    });
    let (first_limit, next_limit) = (state.config.first_token_timeout, state.config.token_timeout);
    let watchdog = async {
        loop {
            let at = latest.load(Ordering::Relaxed);
            let (deadline, what, limit) = if at == NO_TOKEN {
                (first_limit, "first token", first_limit)
            } else {
                (Duration::from_millis(at) + next_limit, "next token", next_limit)
            };
            let elapsed = arrived.elapsed();
            if elapsed >= deadline {
                return (what, limit);
            }
            tokio::time::sleep(deadline - elapsed).await;
        }
    };
    let outcome = tokio::select! {
        r = generation => r.map_err(ApiError::from),
        (what, limit) = watchdog => Err(ApiError::unavailable(
            format!("no {what} within {limit:.0?}"), "timeout", Some(1))),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            m.finished("abort");
            return Err(e);
        }
    };
    m.generation_tokens.inc_by(outcome.tokens.len() as u64);
    m.failovers.inc_by(outcome.failovers.len() as u64);
    m.withdrawn_tokens.inc_by(outcome.withdrawn as u64);
    m.decode_steps.inc_by(outcome.step_times.len() as u64);
    m.spec_drafts.inc_by(outcome.speculation.drafts as u64);
    m.spec_draft_tokens.inc_by(outcome.speculation.draft_tokens as u64);
    m.spec_accepted_tokens.inc_by(outcome.speculation.accepted_tokens as u64);
    if gone {
        m.finished("abort");
        return Err(client_gone());
    }
    if withdrawn || (outcome.withdrawn > 0 && stream.is_some()) {
        // Withdrawn tokens were streamed.
        m.finished("abort");
        return Err(ApiError::unavailable(
            format!(
                "a worker was caught returning wrong results after {} tokens were sent; retry the request",
                ids.len()
            ),
            "wrong_result",
            Some(1),
        ));
    }
    if outcome.tokens.len() < ids.len() {
        // Tokens were withdrawn at the end, with none after them.
        ids.truncate(outcome.tokens.len());
        lps.truncate(outcome.tokens.len());
        text = assembled(&state, &job.stops, &ids);
    }
    let mut rest = text.finish();
    let (content, calls) = match (tool_stream, &stream) {
        (Some(mut ts), Some(_)) => {
            rest = ts.push(&rest);
            let (more, calls) = ts.finish();
            rest.push_str(&more);
            (String::new(), calls)
        }
        (_, None) => match job.tools {
            Some((syntax, constrained)) => {
                let (content, calls) = crate::tools::parse(text.text(), syntax);
                (if constrained { String::new() } else { content }, calls)
            }
            None => (text.text().to_owned(), Vec::new()),
        },
        (None, Some(_)) => (text.text().to_owned(), Vec::new()),
    };
    let finish = if !calls.is_empty() && outcome.finish_reason != FinishReason::Length {
        "tool_calls"
    } else if stopped {
        "stop"
    } else {
        finish_str(outcome.finish_reason)
    };
    m.finished(finish);
    if let Some((tx, meta)) = &stream {
        if !rest.is_empty() {
            send(tx, &chunk(meta, index, Some(&rest), None, false, Value::Null));
        }
        for (k, call) in calls.iter().enumerate() {
            for delta in call_deltas(k, call) {
                let mut c = chunk(meta, index, None, None, false, Value::Null);
                c["choices"][0]["delta"] = json!({"tool_calls": [delta]});
                send(tx, &c);
            }
        }
        // Anthropic's closing events need the usage: `serve` sends them.
        if meta.kind != Kind::Messages {
            let mut last = chunk(meta, index, None, Some(finish), false, Value::Null);
            if meta.kind == Kind::Chat {
                last["choices"][0]["delta"] = json!({});
            }
            send(tx, &last);
        }
    }
    Ok(ChoiceResult {
        index,
        text: content,
        calls,
        finish,
        stop_sequence: text.matched_stop().map(str::to_owned),
        tokens: outcome.tokens.len(),
        logprobs: lps,
    })
}

/// The streamed pieces of call `k`: its id, type and name with empty arguments, then the
/// arguments in two halves (split on a character boundary), as OpenAI streams them.
fn call_deltas(k: usize, call: &Call) -> Vec<Value> {
    let args = &call.arguments;
    let mut half = args.len() / 2;
    while !args.is_char_boundary(half) {
        half += 1;
    }
    let mut out = vec![json!({"index": k, "id": crate::tools::call_id(), "type": "function",
                              "function": {"name": call.name, "arguments": ""}})];
    for piece in [&args[..half], &args[half..]] {
        if !piece.is_empty() {
            out.push(json!({"index": k, "function": {"arguments": piece}}));
        }
    }
    out
}

fn client_gone() -> ApiError {
    let mut e = ApiError::invalid("the client closed the connection", None);
    e.code = Some("client_closed");
    e
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Admits `job`, runs its choices and answers (a JSON body, or server-sent events), in the
/// shapes of the job's endpoint.
pub(crate) async fn serve(state: Arc<ApiState>, job: Job, arrived: Instant) -> Response {
    let anthropic = job.kind == Kind::Messages;
    let permit = match state.admission.admit(job.n, state.config.first_token_timeout).await {
        Ok(p) => p,
        Err(e) => return e.into_response_for(anthropic),
    };
    let m = &state.metrics;
    m.queue.observe(arrived.elapsed().as_secs_f64());
    m.prompt_tokens.inc_by(job.prompt.len() as u64);
    let meta = Arc::new(Meta {
        kind: job.kind,
        id: match job.kind {
            Kind::Chat => format!("chatcmpl-{:016x}", rand::random::<u64>()),
            Kind::Completion => format!("cmpl-{:016x}", rand::random::<u64>()),
            Kind::Messages => format!("msg_{:032x}", rand::random::<u128>()),
        },
        created: now_secs(),
        model: state.model.name.clone(),
    });
    let job = Arc::new(job);
    if !job.stream {
        let mut set = JoinSet::new();
        for i in 0..job.n {
            set.spawn(run_choice(state.clone(), job.clone(), i, arrived, None));
        }
        let mut results = Vec::with_capacity(job.n);
        while let Some(r) = set.join_next().await {
            match r {
                Ok(Ok(c)) => results.push(c),
                // Dropping the set aborts the other choices (closing their sessions).
                Ok(Err(e)) => return e.into_response_for(anthropic),
                Err(e) => return internal(&e).into_response_for(anthropic),
            }
        }
        drop(permit);
        m.e2e.observe(arrived.elapsed().as_secs_f64());
        results.sort_by_key(|c| c.index);
        let completion: usize = results.iter().map(|c| c.tokens).sum();
        if let (true, Some(c)) = (anthropic, results.first()) {
            let stop = anthropic::stop_reason(c.finish, c.stop_sequence.as_deref());
            let m = anthropic::message(
                &meta.id,
                &meta.model,
                Some(&c.text),
                Some(stop),
                job.prompt.len(),
                c.tokens,
            );
            return Json(m).into_response();
        }
        let choices: Vec<Value> = results
            .iter()
            .map(|c| {
                let lp = match job.logprobs {
                    None => Value::Null,
                    Some(_) if job.kind == Kind::Chat => chat_logprobs(&state, &c.logprobs),
                    Some(_) => completion_logprobs(&state, &c.logprobs, &mut 0),
                };
                match job.kind {
                    Kind::Chat if !c.calls.is_empty() => {
                        let calls: Vec<Value> = c
                            .calls
                            .iter()
                            .map(|call| {
                                json!({"id": crate::tools::call_id(), "type": "function",
                                       "function": {"name": call.name, "arguments": call.arguments}})
                            })
                            .collect();
                        let content = if c.text.is_empty() { Value::Null } else { json!(c.text) };
                        json!({"index": c.index, "message": {"role": "assistant", "content": content,
                                "tool_calls": calls}, "logprobs": lp, "finish_reason": c.finish})
                    }
                    Kind::Chat => {
                        json!({"index": c.index, "message": {"role": "assistant", "content": c.text},
                                         "logprobs": lp, "finish_reason": c.finish})
                    }
                    Kind::Completion | Kind::Messages => json!({"index": c.index, "text": c.text,
                                               "logprobs": lp, "finish_reason": c.finish}),
                }
            })
            .collect();
        let object = if job.kind == Kind::Chat { "chat.completion" } else { "text_completion" };
        return Json(json!({
            "id": meta.id, "object": object, "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage(job.prompt.len(), completion),
        }))
        .into_response();
    }

    let (tx, rx) = mpsc::unbounded_channel();
    if anthropic {
        for event in anthropic::opening_events(&meta.id, &meta.model, job.prompt.len()) {
            send(&tx, &event);
        }
    }
    tokio::spawn(async move {
        let _permit = permit;
        let mut set = JoinSet::new();
        for i in 0..job.n {
            set.spawn(run_choice(state.clone(), job.clone(), i, arrived, Some((tx.clone(), meta.clone()))));
        }
        let mut completion = 0;
        let mut stop = None;
        while let Some(r) = set.join_next().await {
            let err = match r {
                Ok(Ok(c)) => {
                    completion += c.tokens;
                    stop = Some(anthropic::stop_reason(c.finish, c.stop_sequence.as_deref()));
                    continue;
                }
                Ok(Err(e)) if e.code == Some("client_closed") => {
                    tracing::info!("client disconnected; sessions closed");
                    return;
                }
                Ok(Err(e)) => e,
                Err(e) => internal(&e),
            };
            // One error event, then the stream closes (no [DONE]); the set's drop aborts
            // the other choices.
            send(&tx, &if anthropic { err.anthropic_body() } else { err.body() });
            return;
        }
        state.metrics.e2e.observe(arrived.elapsed().as_secs_f64());
        if anthropic {
            if let Some(stop) = stop {
                for event in anthropic::closing_events(stop, completion) {
                    send(&tx, &event);
                }
            }
            return;
        }
        if job.include_usage {
            let object = if job.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
            send(
                &tx,
                &json!({"id": meta.id, "object": object, "created": meta.created, "model": meta.model,
                        "choices": [], "usage": usage(job.prompt.len(), completion)}),
            );
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]")));
    });
    Sse::new(UnboundedReceiverStream::new(rx)).keep_alive(KeepAlive::default()).into_response()
}

fn internal(e: &tokio::task::JoinError) -> ApiError {
    tracing::error!("a generation task failed: {e}");
    let mut err = ApiError::unavailable("internal error in a generation task", "internal_error", None);
    err.status = StatusCode::INTERNAL_SERVER_ERROR;
    err.kind = "server_error";
    err
}
