//! The API router driven through tower's `oneshot` (no socket), in front of a real pipeline:
//! SmolLM2 as two in-process stages on loopback iroh endpoints.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use shoal_api::defaults::SamplingDefaults;
use shoal_api::{ApiConfig, ApiState, ServedModel, router};
use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo};
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, NodeOptions};
use shoal_worker::service::{StageConfig, StageService};
use tower::ServiceExt;

fn model_path() -> std::path::PathBuf {
    let p =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

struct Fixture {
    app: axum::Router,
    stages: Vec<Node>,
    state: Arc<ApiState>,
}

/// The settings of the fixtures' stages.
fn stage_config(info: &ModelInfo) -> StageConfig {
    StageConfig {
        max_sessions: 8,
        kv_budget_bytes: 1 << 30,
        per_peer_sessions: 8,
        per_forwarder_sessions: 64,
        idle_timeout: Duration::from_secs(60),
        max_seq_len: 8192,
        model_id: info.model_id,
    }
}

async fn fixture(with_stages: bool) -> Fixture {
    fixture_with(with_stages, ApiConfig { max_body_bytes: 64 * 1024, ..ApiConfig::default() }).await
}

async fn fixture_with(with_stages: bool, config: ApiConfig) -> Fixture {
    fixture_full(with_stages, config, SamplingDefaults::default()).await
}

/// A fixture whose model recommends `recommended` sampling defaults.
async fn fixture_full(with_stages: bool, config: ApiConfig, recommended: SamplingDefaults) -> Fixture {
    let model = Model::open(model_path()).expect("model");
    let info = ModelInfo::of(&model).expect("model info");
    let origin = Node::bind(NodeOptions::loopback()).await.expect("origin");
    let driver = Driver::new(origin, info, DriverConfig::default());
    let mut stages = Vec::new();
    if with_stages {
        for span in [0..15, 15..30] {
            let shard = Shard::load(&model, span, &Device::Cpu, DType::F32).expect("span");
            let config = stage_config(&info);
            let node = Node::bind(NodeOptions::loopback()).await.expect("stage");
            node.serve(StageService::new(shard, config));
            driver.add_peer(node.addr()).await.expect("stage answers");
            stages.push(node);
        }
    }
    let mut served = ServedModel::of(&model, "smollm2").expect("tokenizer and template");
    served.sampling = recommended;
    let state = Arc::new(ApiState::new(Arc::new(driver), served, config).expect("metrics"));
    Fixture { app: router(state.clone()), stages, state }
}

async fn call(app: &axum::Router, method: &str, path: &str, body: Option<Value>) -> (StatusCode, String) {
    let req = HttpRequest::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(body.map_or(Body::empty(), |b| Body::from(b.to_string())))
        .expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8"))
}

fn json_of(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

fn error_of(status: StatusCode, body: &str, want: StatusCode) -> Value {
    assert_eq!(status, want, "{body}");
    let v = json_of(body);
    let e = &v["error"];
    assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{body}");
    v
}

/// The `data:` payloads of a server-sent-events body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_and_completions_stream_and_not() {
    let f = fixture(true).await;
    let (s, b) = call(&f.app, "GET", "/health", None).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = call(&f.app, "GET", "/v1/models", None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json_of(&b)["data"][0]["id"], "smollm2");

    let chat = json!({
        "model": "smollm2",
        "messages": [{"role": "system", "content": "You are brief."},
                     {"role": "user", "content": [{"type": "text", "text": "Name a color."}]}],
        "max_tokens": 12, "temperature": 0.8, "seed": 7, "some_unknown_field": {"x": 1},
    });
    let (s, b) = call(&f.app, "POST", "/v1/chat/completions", Some(chat.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let full = json_of(&b);
    let text = full["choices"][0]["message"]["content"].as_str().expect("content").to_owned();
    assert_eq!(full["object"], "chat.completion");
    assert_eq!(full["choices"][0]["message"]["role"], "assistant");
    let n = full["usage"]["completion_tokens"].as_u64().expect("usage");
    assert!((1..=12).contains(&n));
    assert_eq!(
        full["usage"]["total_tokens"].as_u64(),
        Some(full["usage"]["prompt_tokens"].as_u64().expect("prompt tokens") + n)
    );
    assert_eq!(full["choices"][0]["finish_reason"], if n == 12 { "length" } else { "stop" });
    // Same seed, same text.
    let (_, b2) = call(&f.app, "POST", "/v1/chat/completions", Some(chat.clone())).await;
    assert_eq!(json_of(&b2)["choices"][0]["message"]["content"], text.as_str());

    // Streaming: the deltas concatenate to the same text; usage comes last; then [DONE].
    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let (s, b) = call(&f.app, "POST", "/v1/chat/completions", Some(streamed)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let data = sse_data(&b);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{b}");
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| json_of(d)).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let joined: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(joined, text);
    let usage = chunks.last().expect("usage chunk");
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"].as_u64(), Some(n));
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, &full["choices"][0]["finish_reason"]);

    // Completions, with a stop string: the text ends before it.
    let comp = json!({"prompt": "The capital of France is", "max_tokens": 20, "temperature": 0});
    let (s, b) = call(&f.app, "POST", "/v1/completions", Some(comp.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let plain = json_of(&b)["choices"][0]["text"].as_str().expect("text").to_owned();
    assert!(plain.starts_with(" Paris"), "{plain}");
    let mut stopped = comp.clone();
    stopped["stop"] = json!(["\n", "."]);
    let (_, b) = call(&f.app, "POST", "/v1/completions", Some(stopped.clone())).await;
    let v = json_of(&b);
    assert_eq!(v["choices"][0]["text"], " Paris");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let (_, b) = call(&f.app, "POST", "/v1/completions", Some(stopped)).await;
    let data = sse_data(&b);
    let joined: String = data[..data.len() - 1]
        .iter()
        .map(|d| json_of(d)["choices"][0]["text"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(joined, " Paris");
    // max_completion_tokens is max_tokens' alias.
    let (_, b) = call(
        &f.app,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": ["Once upon a time"], "max_completion_tokens": 3, "temperature": 0})),
    )
    .await;
    let v = json_of(&b);
    assert_eq!(
        (v["usage"]["completion_tokens"].as_u64(), &v["choices"][0]["finish_reason"]),
        (Some(3), &json!("length"))
    );
    for s in &f.stages {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_and_no_route_is_503() {
    let f = fixture(true).await;
    let (s, b) = call(&f.app, "POST", "/v1/chat/completions", None).await;
    error_of(s, &b, StatusCode::BAD_REQUEST);
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from("{not json"))
        .expect("request");
    let resp = f.app.clone().oneshot(req).await.expect("response");
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let bad = [
        json!({"messages": []}),
        json!({"messages": "hello"}),
        json!({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}),
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 0}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0, "max_completion_tokens": 4}),
        json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "stop": "x".repeat(257)}),
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 99}),
        json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}),
        json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true, "top_logprobs": 21}),
        json!({"messages": [{"role": "tool", "content": "hi"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 1e300}),
        json!({"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}),
        json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9999999}),
        json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ];
    for body in bad {
        let (s, b) = call(&f.app, "POST", "/v1/chat/completions", Some(body.clone())).await;
        error_of(s, &b, StatusCode::BAD_REQUEST);
    }
    // A prompt longer than the context: 400, never truncated.
    let long = "word ".repeat(9000);
    let (s, b) = call(&f.app, "POST", "/v1/completions", Some(json!({"prompt": long}))).await;
    // The body limit (64 KiB here) may refuse it first.
    assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::PAYLOAD_TOO_LARGE, "{s} {b}");
    error_of(s, &b, s);
    let (s, b) = call(&f.app, "POST", "/v1/completions", Some(json!({"prompt": "x ".repeat(40_000)}))).await;
    error_of(s, &b, StatusCode::PAYLOAD_TOO_LARGE);
    let (s, b) = call(&f.app, "POST", "/v1/completions", Some(json!({"prompt": "word ".repeat(8200)}))).await;
    let v = error_of(s, &b, StatusCode::BAD_REQUEST);
    assert!(v["error"]["message"].as_str().expect("message").contains("context"), "{v}");
    let (s, b) =
        call(&f.app, "POST", "/v1/completions", Some(json!({"prompt": "hi", "model": "gpt-4"}))).await;
    error_of(s, &b, StatusCode::NOT_FOUND);
    let (s, b) = call(&f.app, "GET", "/v1/nothing", None).await;
    error_of(s, &b, StatusCode::NOT_FOUND);

    // No stages: health and requests are 503 with a reason.
    let empty = fixture(false).await;
    let (s, b) = call(&empty.app, "GET", "/health", None).await;
    error_of(s, &b, StatusCode::SERVICE_UNAVAILABLE);
    let (s, b) =
        call(&empty.app, "POST", "/v1/completions", Some(json!({"prompt": "hi", "max_tokens": 2}))).await;
    error_of(s, &b, StatusCode::SERVICE_UNAVAILABLE);
    for s in &f.stages {
        s.shutdown().await;
    }
}

/// The bytes of each token of a chat `logprobs.content` list, concatenated.
fn logprob_bytes(content: &Value) -> Vec<u8> {
    content
        .as_array()
        .expect("content list")
        .iter()
        .flat_map(|e| e["bytes"].as_array().expect("bytes").iter().map(|b| b.as_u64().expect("byte") as u8))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_n_choices_and_token_prompts() {
    let f = fixture(true).await;
    let msgs = json!([{"role": "user", "content": "Write one sentence about the sea."}]);
    // Chat logprobs, greedy: one entry per token, the chosen token is the top alternative,
    // the tokens' bytes spell the text.
    let body =
        json!({"messages": msgs, "max_tokens": 10, "temperature": 0, "logprobs": true, "top_logprobs": 3});
    let (s, b) = call(&f.app, "POST", "/v1/chat/completions", Some(body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = json_of(&b);
    let choice = &v["choices"][0];
    let content = &choice["logprobs"]["content"];
    let n = v["usage"]["completion_tokens"].as_u64().expect("usage") as usize;
    assert_eq!(content.as_array().expect("list").len(), n, "{b}");
    for e in content.as_array().expect("list") {
        let top = e["top_logprobs"].as_array().expect("top");
        assert_eq!(top.len(), 3);
        assert_eq!(top[0]["token"], e["token"], "greedy takes the most likely token: {e}");
        assert!((top[0]["logprob"].as_f64().expect("lp") - e["logprob"].as_f64().expect("lp")).abs() < 1e-6);
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().expect("lp")).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]) && lps[0] <= 0.0, "{lps:?}");
    }
    if choice["finish_reason"] == "length" {
        assert_eq!(String::from_utf8(logprob_bytes(content)).expect("utf-8"), choice["message"]["content"]);
    }
    // Streamed, the chunks carry the same entries.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, sb) = call(&f.app, "POST", "/v1/chat/completions", Some(streamed)).await;
    let data = sse_data(&sb);
    let entries: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| json_of(d))
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&Value::Array(entries), content);

    // Completions logprobs (an integer there): tokens spell the text, offsets increase.
    let comp =
        json!({"prompt": "The three primary colors are", "max_tokens": 8, "temperature": 0, "logprobs": 2});
    let (s, b) = call(&f.app, "POST", "/v1/completions", Some(comp.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = json_of(&b);
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> =
        lp["tokens"].as_array().expect("tokens").iter().map(|t| t.as_str().expect("s")).collect();
    assert_eq!(tokens.concat(), v["choices"][0]["text"].as_str().expect("text"));
    assert_eq!(lp["token_logprobs"].as_array().expect("lps").len(), tokens.len());
    assert!(
        lp["top_logprobs"]
            .as_array()
            .expect("top")
            .iter()
            .all(|m| m.as_object().is_some_and(|m| m.len() <= 2))
    );
    let offsets: Vec<u64> =
        lp["text_offset"].as_array().expect("offsets").iter().map(|o| o.as_u64().expect("o")).collect();
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]) && offsets[0] == 0, "{offsets:?}");
    // The same prompt given as token ids gives the same completion.
    let ids = f.state.model.tokenizer.encode("The three primary colors are", true).expect("encode");
    let (_, b2) = call(
        &f.app,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": ids, "max_tokens": 8, "temperature": 0})),
    )
    .await;
    assert_eq!(json_of(&b2)["choices"][0]["text"], v["choices"][0]["text"]);

    // n = 3: choice i is what n = 1 gives with seed + i; usage sums the choices.
    let sampled = json!({"messages": msgs, "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3});
    let (s, b) = call(&f.app, "POST", "/v1/chat/completions", Some(sampled.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = json_of(&b);
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().expect("index")).collect::<Vec<_>>(), [0, 1, 2]);
    let mut total = 0;
    for (i, c) in choices.iter().enumerate() {
        let mut one = sampled.clone();
        one["n"] = json!(1);
        one["seed"] = json!(5 + i);
        let (_, b1) = call(&f.app, "POST", "/v1/chat/completions", Some(one)).await;
        let v1 = json_of(&b1);
        assert_eq!(v1["choices"][0]["message"]["content"], c["message"]["content"], "choice {i}");
        total += v1["usage"]["completion_tokens"].as_u64().expect("usage");
    }
    assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(total));
    // Streamed with n = 2: each index's deltas spell that choice's text.
    let mut streamed = sampled.clone();
    streamed["n"] = json!(2);
    streamed["stream"] = json!(true);
    let (_, sb) = call(&f.app, "POST", "/v1/chat/completions", Some(streamed)).await;
    let data = sse_data(&sb);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    for (i, c) in choices.iter().take(2).enumerate() {
        let text: String = data[..data.len() - 1]
            .iter()
            .map(|d| json_of(d))
            .filter(|c| c["choices"][0]["index"] == i)
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, c["message"]["content"].as_str().expect("text"), "choice {i}");
    }
    for s in &f.stages {
        s.shutdown().await;
    }
}

async fn call_with_key(app: &axum::Router, path: &str, key: Option<&str>) -> (StatusCode, String) {
    let mut req = HttpRequest::builder().method("GET").uri(path);
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let resp = app.clone().oneshot(req.body(Body::empty()).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_guard_v1_and_metrics() {
    let config = ApiConfig { api_keys: vec!["sekret".into(), "other".into()], ..ApiConfig::default() };
    let f = fixture_with(false, config).await;
    for key in [None, Some("wrong"), Some("sekre"), Some("sekret2")] {
        let (s, b) = call_with_key(&f.app, "/v1/models", key).await;
        let v = error_of(s, &b, StatusCode::UNAUTHORIZED);
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    for key in ["sekret", "other"] {
        let (s, b) = call_with_key(&f.app, "/v1/models", Some(key)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
    }
    // Metrics need the key too (they tell load and model names)...
    let (s, b) = call_with_key(&f.app, "/metrics", None).await;
    error_of(s, &b, StatusCode::UNAUTHORIZED);
    let (s, b) = call_with_key(&f.app, "/metrics", Some("sekret")).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b.contains("shoal_"), "{b}");
    // ...unless the operator makes them public.
    let config = ApiConfig { api_keys: vec!["sekret".into()], public_metrics: true, ..ApiConfig::default() };
    let public = fixture_with(false, config).await;
    let (s, _) = call_with_key(&public.app, "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    // Health and the OpenAPI document stay open.
    let (s, _) = call_with_key(&f.app, "/health", None).await;
    assert_ne!(s, StatusCode::UNAUTHORIZED);
    let (s, b) = call_with_key(&f.app, "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    let doc = json_of(&b);
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/v1/chat/completions"]["post"].is_object());
    assert_eq!(
        doc["components"]["schemas"]["ChatRequest"]["properties"]["model"]["enum"],
        json!(["smollm2", null])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_queue_deadlines_and_metrics() {
    let config = ApiConfig {
        max_running: 1,
        max_waiting: 1,
        first_token_timeout: Duration::from_secs(5),
        ..ApiConfig::default()
    };
    let f = fixture_with(true, config).await;
    // A long streamed request holds the only session.
    // (Far more tokens than it gets the time to make: it is dropped below.)
    let long = json!({"prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "stream": true});
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(long.to_string()))
        .expect("request");
    let held = f.app.clone().oneshot(req).await.expect("response");
    assert_eq!(held.status(), StatusCode::OK);
    assert_eq!(f.state.admission().running(), 1);
    // Its first token has come (so its own first-token deadline is behind it).
    let mut held = held.into_body();
    let first = held.frame().await.expect("a first event").expect("body");
    assert!(first.data_ref().is_some_and(|d| d.starts_with(b"data: ")), "{first:?}");
    // The next one waits in the queue; one more finds the queue full: 429 + Retry-After.
    let waiter = {
        let app = f.app.clone();
        tokio::spawn(async move {
            call(&app, "POST", "/v1/completions", Some(json!({"prompt": "Hi", "max_tokens": 2}))).await
        })
    };
    let t0 = std::time::Instant::now();
    while f.state.admission().waiting() == 0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "the second request never queued");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let req = HttpRequest::builder()
        .method("POST")
        .uri("/v1/completions")
        .body(Body::from(json!({"prompt": "Hi", "max_tokens": 2}).to_string()))
        .expect("request");
    let full = f.app.clone().oneshot(req).await.expect("response");
    assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(full.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"));
    // The waiter's first-token deadline passes while it queues: 503.
    let (s, b) = waiter.await.expect("waiter");
    let v = error_of(s, &b, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(v["error"]["code"], "queue_timeout");
    // The client of the long request goes away: its session ends and the slot frees.
    drop(held);
    let t0 = std::time::Instant::now();
    while f.state.admission().running() > 0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "the dropped stream's session never ended");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Greedy, so that it ends by length (a sampled continuation of "Hi" can be an EOS).
    let done = json!({"prompt": "Once upon a time", "max_tokens": 3, "temperature": 0});
    let (s, b) = call(&f.app, "POST", "/v1/completions", Some(done)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v: Value = serde_json::from_str(&b).expect("json");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{b}");
    // Every stage's KV budget is back to full once the sessions closed.
    let t0 = std::time::Instant::now();
    while f.stages.iter().any(|n| n.stage_stats().is_some_and(|st| st.sessions > 0)) {
        assert!(t0.elapsed() < Duration::from_secs(10), "sessions left open on a stage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Metrics: vLLM's series under shoal_, with the model name.
    let mesh = tokio::spawn(shoal_api::watch_mesh(f.state.clone(), Duration::from_millis(50)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    mesh.abort();
    let (s, text) = call(&f.app, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(value("shoal_request_success_total{finished_reason=\"length\",model_name=\"smollm2\"}"), 1.0);
    assert!(value("shoal_request_success_total{finished_reason=\"abort\",model_name=\"smollm2\"}") >= 1.0);
    assert!(value("shoal_time_to_first_token_seconds_count{model_name=\"smollm2\"}") >= 2.0);
    assert!(value("shoal_inter_token_latency_seconds_count{model_name=\"smollm2\"}") >= 2.0);
    assert_eq!(value("shoal_e2e_request_latency_seconds_count{model_name=\"smollm2\"}"), 1.0);
    assert!(value("shoal_generation_tokens_total{model_name=\"smollm2\"}") >= 4.0);
    assert!(value("shoal_prompt_tokens_total{model_name=\"smollm2\"}") >= 2.0);
    assert_eq!(value("shoal_num_requests_running{model_name=\"smollm2\"}"), 0.0);
    assert_eq!(value("shoal_num_requests_waiting{model_name=\"smollm2\"}"), 0.0);
    assert_eq!(value("shoal_live_peers{model_name=\"smollm2\"}"), 2.0);
    assert!(value("shoal_hop_latency_seconds_count{model_name=\"smollm2\"}") >= 2.0);
    assert_eq!(value("shoal_failovers_total{model_name=\"smollm2\"}"), 0.0);
    for s in &f.stages {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_first_token_deadline_is_a_503() {
    let config = ApiConfig { first_token_timeout: Duration::from_millis(1), ..ApiConfig::default() };
    let f = fixture_with(true, config).await;
    let (s, b) = call(
        &f.app,
        "POST",
        "/v1/completions",
        Some(json!({"prompt": "word ".repeat(300), "max_tokens": 2})),
    )
    .await;
    let v = error_of(s, &b, StatusCode::SERVICE_UNAVAILABLE);
    assert!(v["error"]["message"].as_str().expect("message").contains("first token"), "{v}");
    for s in &f.stages {
        s.shutdown().await;
    }
}

/// A request with extra headers; the status, the response's headers and its body.
async fn call_headers(
    app: &axum::Router,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Value>,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let mut req = HttpRequest::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if body.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(body.map_or(Body::empty(), |b| Body::from(b.to_string()))).expect("request");
    let resp = app.clone().oneshot(req).await.expect("response");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).expect("utf-8"))
}

/// The text of a chat completion request's first choice.
async fn chat_text(app: &axum::Router, body: Value) -> String {
    let (s, b) = call(app, "POST", "/v1/chat/completions", Some(body)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    json_of(&b)["choices"][0]["message"]["content"].as_str().expect("content").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_defaults_fill_what_a_request_leaves_out_and_ignore_eos_runs_on() {
    let msgs = json!([{"role": "user", "content": "Name three fruits."}]);
    // No operator default, no recommendation: shoal's own defaults.
    let f = fixture(true).await;
    let mut openai_differs = false;
    for seed in [1, 2, 3, 4] {
        let bare = chat_text(&f.app, json!({"messages": msgs, "max_tokens": 10, "seed": seed})).await;
        let shoal = json!({"messages": msgs, "max_tokens": 10, "seed": seed,
                           "temperature": 0.2, "top_p": 0.9, "top_k": -1, "min_p": 0.0});
        assert_eq!(bare, chat_text(&f.app, shoal).await, "seed {seed}");
        let openai = json!({"messages": msgs, "max_tokens": 10, "seed": seed,
                            "temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0});
        openai_differs |= bare != chat_text(&f.app, openai).await;
    }
    assert!(openai_differs, "the defaults are not OpenAI's (temperature 1 over the whole vocabulary)");

    // ignore_eos: greedy, the answer ends at the end of sequence well before 48 tokens;
    // with ignore_eos it runs to max_tokens.
    for (path, body) in
        [("/v1/chat/completions", json!({"messages": msgs, "max_tokens": 48, "temperature": 0}))]
    {
        let (s, b) = call(&f.app, "POST", path, Some(body.clone())).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let v = json_of(&b);
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert!(v["usage"]["completion_tokens"].as_u64().expect("usage") < 48, "{v}");
        let mut on = body.clone();
        on["ignore_eos"] = json!(true);
        let (s, b) = call(&f.app, "POST", path, Some(on)).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let v = json_of(&b);
        assert_eq!(
            (v["usage"]["completion_tokens"].as_u64(), &v["choices"][0]["finish_reason"]),
            (Some(48), &json!("length")),
            "{v}"
        );
    }
    for s in &f.stages {
        s.shutdown().await;
    }

    // The operator's default wins over the model's recommendation, which wins over shoal's;
    // a request's own field wins over all.
    let recommended =
        SamplingDefaults { temperature: Some(0.5), top_k: Some(5), ..SamplingDefaults::default() };
    let operator = SamplingDefaults { temperature: Some(0.0), ..SamplingDefaults::default() };
    let f = fixture_full(true, ApiConfig { sampling: operator, ..ApiConfig::default() }, recommended).await;
    let greedy = chat_text(&f.app, json!({"messages": msgs, "max_tokens": 10, "temperature": 0})).await;
    for seed in [1, 2] {
        let bare = chat_text(&f.app, json!({"messages": msgs, "max_tokens": 10, "seed": seed})).await;
        assert_eq!(bare, greedy, "the operator's temperature 0");
        let hot = json!({"messages": msgs, "max_tokens": 10, "seed": seed, "temperature": 1.2});
        let spelled = json!({"messages": msgs, "max_tokens": 10, "seed": seed, "temperature": 1.2,
                             "top_k": 5, "top_p": 0.9, "min_p": 0.0});
        assert_eq!(chat_text(&f.app, hot).await, chat_text(&f.app, spelled).await, "the model's top_k");
    }
    for s in &f.stages {
        s.shutdown().await;
    }
}

/// Server-sent events as (event name, data).
fn sse_events(body: &str) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut name = String::new();
    for line in body.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_owned();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((std::mem::take(&mut name), json_of(d)));
        }
    }
    out
}

fn anthropic_error(status: StatusCode, body: &str, want: StatusCode, kind: &str) {
    assert_eq!(status, want, "{body}");
    let v = json_of(body);
    assert_eq!(v["type"], "error", "{body}");
    assert_eq!(v["error"]["type"], kind, "{body}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_answer_like_chat_completions() {
    let config = ApiConfig { api_keys: vec!["sekret".into()], ..ApiConfig::default() };
    let f = fixture_with(true, config).await;
    let key = [("x-api-key", "sekret"), ("anthropic-version", "2023-06-01")];
    let post = |body: Value, headers: &'static [(&'static str, &'static str)]| {
        let app = f.app.clone();
        async move { call_headers(&app, "POST", "/v1/messages", headers, Some(body)).await }
    };
    const KEY: &[(&str, &str)] = &[("x-api-key", "sekret")];
    let body = json!({
        "model": "smollm2", "max_tokens": 24, "temperature": 0,
        "system": [{"type": "text", "text": "You are brief."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Name a color."}]}],
    });
    // Keys: x-api-key or Bearer; a wrong or missing one is Anthropic's 401.
    for headers in [&[][..], &[("x-api-key", "wrong")][..]] {
        let (s, _, b) = call_headers(&f.app, "POST", "/v1/messages", headers, Some(body.clone())).await;
        anthropic_error(s, &b, StatusCode::UNAUTHORIZED, "authentication_error");
    }
    let (s, _, bearer) = call_headers(
        &f.app,
        "POST",
        "/v1/messages",
        &[("authorization", "Bearer sekret")],
        Some(body.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{bearer}");
    let (s, _, b) = call_headers(&f.app, "POST", "/v1/messages", &key, Some(body.clone())).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let m = json_of(&b);
    assert_eq!(json_of(&bearer)["content"], m["content"]);
    assert_eq!(
        (&m["type"], &m["role"], &m["model"]),
        (&json!("message"), &json!("assistant"), &json!("smollm2"))
    );
    assert!(m["id"].as_str().is_some_and(|id| id.starts_with("msg_")), "{m}");
    let text = m["content"][0]["text"].as_str().expect("a text block").to_owned();
    assert_eq!(m["content"][0]["type"], "text");
    assert_eq!(m["content"].as_array().map(Vec::len), Some(1));
    // The same conversation through chat completions: the same text and token counts.
    let chat = json!({"model": "smollm2", "max_tokens": 24, "temperature": 0,
        "messages": [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a color."}]});
    let (s, _, cb) = call_headers(&f.app, "POST", "/v1/chat/completions", KEY, Some(chat)).await;
    assert_eq!(s, StatusCode::OK, "{cb}");
    let c = json_of(&cb);
    assert_eq!(c["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(m["usage"]["input_tokens"], c["usage"]["prompt_tokens"]);
    assert_eq!(m["usage"]["output_tokens"], c["usage"]["completion_tokens"]);
    let (reason, n) = (m["stop_reason"].as_str().expect("stop_reason"), m["usage"]["output_tokens"].as_u64());
    assert_eq!(reason, if n == Some(24) { "max_tokens" } else { "end_turn" }, "{m}");
    assert!(m["stop_sequence"].is_null());

    // count_tokens: the prompt the request would have.
    let mut counted = body.clone();
    counted.as_object_mut().expect("object").remove("max_tokens");
    let (s, _, cb) = call_headers(&f.app, "POST", "/v1/messages/count_tokens", KEY, Some(counted)).await;
    assert_eq!(s, StatusCode::OK, "{cb}");
    assert_eq!(json_of(&cb)["input_tokens"], m["usage"]["input_tokens"]);

    // Streaming: Anthropic's events in Anthropic's order; the deltas spell the same text.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (s, headers, sb) = post(streamed, KEY).await;
    assert_eq!(s, StatusCode::OK, "{sb}");
    assert!(headers["content-type"].to_str().expect("ascii").starts_with("text/event-stream"));
    let events = sse_events(&sb);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let k = names.len();
    assert!(k >= 7, "{names:?}");
    assert_eq!(names[..3], ["message_start", "content_block_start", "ping"], "{names:?}");
    assert_eq!(names[k - 3..], ["content_block_stop", "message_delta", "message_stop"], "{names:?}");
    assert!(names[3..k - 3].iter().all(|n| *n == "content_block_delta"), "{names:?}");
    for (name, data) in &events {
        assert_eq!(data["type"], name.as_str(), "every event's data names its type");
    }
    let start = &events[0].1["message"];
    assert_eq!((start["content"].clone(), start["stop_reason"].clone()), (json!([]), Value::Null));
    assert_eq!(start["usage"]["input_tokens"], m["usage"]["input_tokens"]);
    let joined: String =
        events[3..k - 3].iter().map(|(_, d)| d["delta"]["text"].as_str().expect("text_delta")).collect();
    assert_eq!(joined, text);
    let delta = &events[k - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], m["stop_reason"]);
    assert_eq!(delta["usage"]["output_tokens"], m["usage"]["output_tokens"]);

    // stop_sequences: the text ends before the first one met, and the answer names it.
    let word = text.split_whitespace().nth(1).expect("two words").to_owned();
    let mut stopped = body.clone();
    stopped["stop_sequences"] = json!(["zzz-never", word]);
    let (s, _, b) = post(stopped, KEY).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let v = json_of(&b);
    assert_eq!((&v["stop_reason"], &v["stop_sequence"]), (&json!("stop_sequence"), &json!(word)), "{v}");
    assert_eq!(v["content"][0]["text"].as_str(), text.find(&word).map(|i| &text[..i]));
    // max_tokens ends it too.
    let mut short = body.clone();
    short["max_tokens"] = json!(2);
    let (_, _, b) = post(short, KEY).await;
    let v = json_of(&b);
    assert_eq!((&v["stop_reason"], &v["usage"]["output_tokens"]), (&json!("max_tokens"), &json!(2)), "{v}");

    // Errors in Anthropic's format.
    let mut no_max = body.clone();
    no_max.as_object_mut().expect("object").remove("max_tokens");
    let (s, _, b) = post(no_max, KEY).await;
    anthropic_error(s, &b, StatusCode::BAD_REQUEST, "invalid_request_error");
    assert!(b.contains("max_tokens"), "{b}");
    for bad in [
        json!({"max_tokens": 8, "messages": []}),
        json!({"max_tokens": 8, "messages": [{"role": "system", "content": "hi"}]}),
        json!({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
        json!({"max_tokens": 8, "temperature": -1, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}),
    ] {
        let (s, _, b) = post(bad.clone(), KEY).await;
        anthropic_error(s, &b, StatusCode::BAD_REQUEST, "invalid_request_error");
    }
    let (s, _, b) = post(
        json!({"model": "claude-x", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}),
        KEY,
    )
    .await;
    anthropic_error(s, &b, StatusCode::NOT_FOUND, "not_found_error");
    for s in &f.stages {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_answers_preflights_for_listed_origins_only() {
    let preflight = |origin: &'static str| {
        [
            ("origin", origin),
            ("access-control-request-method", "POST"),
            ("access-control-request-headers", "authorization,content-type"),
        ]
    };
    // No --cors-origin: no CORS headers at all.
    let f = fixture_with(false, ApiConfig { api_keys: vec!["k".into()], ..ApiConfig::default() }).await;
    let (_, h, _) =
        call_headers(&f.app, "OPTIONS", "/v1/chat/completions", &preflight("http://a.test"), None).await;
    assert!(h.get("access-control-allow-origin").is_none(), "{h:?}");

    let config = ApiConfig {
        api_keys: vec!["k".into()],
        cors_origins: vec!["http://a.test".into(), "https://b.test:8443".into()],
        ..ApiConfig::default()
    };
    let f = fixture_with(false, config).await;
    for origin in ["http://a.test", "https://b.test:8443"] {
        // The preflight needs no key and is answered with what the browser asked for.
        let (s, h, b) =
            call_headers(&f.app, "OPTIONS", "/v1/chat/completions", &preflight(origin), None).await;
        assert!(s.is_success(), "{s} {b}");
        assert_eq!(h["access-control-allow-origin"], origin, "{h:?}");
        let methods = h["access-control-allow-methods"].to_str().expect("ascii");
        assert!(methods.contains("POST") && methods.contains("GET"), "{methods}");
        let allowed = h["access-control-allow-headers"].to_str().expect("ascii").to_ascii_lowercase();
        assert!(allowed.contains("authorization") && allowed.contains("content-type"), "{allowed}");
        assert_eq!(h["access-control-max-age"], "600");
        // The real request carries the header too.
        let (s, h, b) = call_headers(
            &f.app,
            "GET",
            "/v1/models",
            &[("origin", origin), ("authorization", "Bearer k")],
            None,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert_eq!(h["access-control-allow-origin"], origin, "{h:?}");
    }
    // An origin not listed gets no Access-Control-Allow-Origin: the browser refuses.
    for origin in ["http://evil.test", "http://a.test:8080", "https://a.test"] {
        let (_, h, _) =
            call_headers(&f.app, "OPTIONS", "/v1/chat/completions", &preflight(origin), None).await;
        assert!(h.get("access-control-allow-origin").is_none(), "{origin}: {h:?}");
        let (_, h, _) = call_headers(
            &f.app,
            "GET",
            "/v1/models",
            &[("origin", origin), ("authorization", "Bearer k")],
            None,
        )
        .await;
        assert!(h.get("access-control-allow-origin").is_none(), "{origin}: {h:?}");
    }
}

/// Sends `req` with a body and the given content type.
async fn post_raw(
    app: &axum::Router,
    path: &str,
    content_type: Option<&str>,
    body: Body,
) -> (StatusCode, String) {
    let mut req = HttpRequest::builder().method("POST").uri(path);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    let resp = app.clone().oneshot(req.body(body).expect("request")).await.expect("response");
    let status = resp.status();
    let bytes = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8(bytes.to_vec()).expect("utf-8"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_is_415_and_every_error_is_an_envelope() {
    let config = ApiConfig {
        max_body_bytes: 64 * 1024,
        body_timeout: Duration::from_millis(300),
        ..ApiConfig::default()
    };
    let f = fixture_with(false, config).await;
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).to_string();
    for ct in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let (s, b) = post_raw(&f.app, "/v1/chat/completions", Some(ct), Body::from(chat.clone())).await;
        let v = error_of(s, &b, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(v["error"]["code"], "unsupported_media_type", "{ct}");
    }
    let (s, b) = post_raw(&f.app, "/v1/messages", Some("text/plain"), Body::from(chat.clone())).await;
    anthropic_error(s, &b, StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request_error");
    // JSON with parameters, a +json type, or no type at all go through to the parser.
    for ct in [Some("application/json; charset=utf-8"), Some("application/vnd.api+json"), None] {
        let (s, b) = post_raw(&f.app, "/v1/completions", ct, Body::from("{not json")).await;
        let v = error_of(s, &b, StatusCode::BAD_REQUEST);
        assert!(v["error"]["message"].as_str().expect("message").contains("invalid request body"), "{b}");
    }
    // A path that does not decode, an unknown path, a wrong method.
    let (s, b) = call(&f.app, "GET", "/v1/models/%FF%FE", None).await;
    let v = error_of(s, &b, StatusCode::BAD_REQUEST);
    assert_eq!(v["error"]["param"], "model");
    let (s, b) = call(&f.app, "GET", "/v2/nothing", None).await;
    error_of(s, &b, StatusCode::NOT_FOUND);
    let (s, b) = call(&f.app, "DELETE", "/v1/models", None).await;
    error_of(s, &b, StatusCode::METHOD_NOT_ALLOWED);
    // Too large, by its declared length and by what arrives without one.
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(70 * 1024));
    let (s, b) = post_raw(&f.app, "/v1/completions", Some("application/json"), Body::from(big.clone())).await;
    let v = error_of(s, &b, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(v["error"]["code"], "request_too_large");
    let chunks =
        big.into_bytes().chunks(4096).map(|c| Ok::<_, std::io::Error>(c.to_vec())).collect::<Vec<_>>();
    let streamed = Body::from_stream(tokio_stream::iter(chunks));
    let (s, b) = post_raw(&f.app, "/v1/completions", Some("application/json"), streamed).await;
    error_of(s, &b, StatusCode::PAYLOAD_TOO_LARGE);
    // A body that stops arriving: 408 after the body timeout.
    let stalled = tokio_stream::StreamExt::chain(
        tokio_stream::iter([Ok::<_, std::io::Error>(b"{\"prompt\": ".to_vec())]),
        tokio_stream::pending(),
    );
    let (s, b) =
        post_raw(&f.app, "/v1/completions", Some("application/json"), Body::from_stream(stalled)).await;
    let v = error_of(s, &b, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(v["error"]["code"], "request_timeout");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_prompts_are_tokenized_like_small_ones() {
    let config = ApiConfig { max_body_bytes: 1 << 20, ..ApiConfig::default() };
    let f = fixture_with(false, config).await;
    // Counted on the blocking pool (over 16 KiB) and inline: the same tokenizer, so a prompt
    // of k copies of a sentence ending in a newline counts k times the sentence's tokens
    // plus the template's fixed part.
    let count = |copies: usize| {
        let app = f.app.clone();
        async move {
            let text = "The quick brown fox jumps over the lazy dog.\n".repeat(copies);
            let body = json!({"messages": [{"role": "user", "content": text}], "max_tokens": 1});
            let (s, _, b) = call_headers(&app, "POST", "/v1/messages/count_tokens", &[], Some(body)).await;
            assert_eq!(s, StatusCode::OK, "{b}");
            json_of(&b)["input_tokens"].as_u64().expect("count")
        }
    };
    let (one, two, many) = (count(1).await, count(2).await, count(1000).await);
    let per_copy = two - one;
    assert!(per_copy > 5, "{one} {two}");
    assert_eq!(many, one + 999 * per_copy, "a 45 KB prompt counts as the small ones predict");
}

/// Opens a raw TCP connection to the server.
async fn connect(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.expect("connect")
}

/// One request on a fresh connection; the status line and the body.
async fn raw_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = connect(addr).await;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// Whether the server closes `s` (EOF or reset) within `within`.
async fn closed_by_server(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    loop {
        match tokio::time::timeout(within, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue, // a 408 the server wrote before closing
            Err(_) => return false,
        }
    }
}

/// The API (no stages) served on a loopback socket under `limits`, until `stop` fires.
async fn real_server(
    limits: shoal_api::server::ServerLimits,
) -> (std::net::SocketAddr, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let f = fixture_with(false, ApiConfig::default()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(shoal_api::server::serve(listener, f.app.clone(), limits, async {
        let _ = stopped.await;
    }));
    (addr, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_do_not_block_requests_and_are_closed() {
    use shoal_api::server::ServerLimits;
    use tokio::io::AsyncWriteExt;
    let limits = ServerLimits { max_connections: 256, header_timeout: Duration::from_secs(1) };
    let (addr, stop, server) = real_server(limits).await;
    // 200 idle connections: 150 that send nothing and 50 that send half a request line.
    let mut idle = Vec::new();
    for i in 0..200 {
        let mut s = connect(addr).await;
        if i % 4 == 0 {
            s.write_all(b"GET /v1/models HTTP/1.1\r\nhost: te").await.expect("write");
        }
        idle.push(s);
    }
    for _ in 0..10 {
        let r = raw_get(addr, "/v1/models").await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("smollm2"), "{r}");
    }
    // The header timeout closes every one of them.
    for s in &mut idle {
        assert!(closed_by_server(s, Duration::from_secs(20)).await, "an idle connection stayed open");
    }
    let _ = stop.send(());
    server.await.expect("server task").expect("server");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_a_503_envelope() {
    use shoal_api::server::ServerLimits;
    use tokio::io::AsyncReadExt;
    let limits = ServerLimits { max_connections: 4, header_timeout: Duration::from_secs(30) };
    let (addr, stop, server) = real_server(limits).await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect(addr).await);
    }
    // Accepts are in order: the server takes the four before the fifth.
    let mut extra = connect(addr).await;
    let mut out = String::new();
    extra.read_to_string(&mut out).await.expect("read");
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    let body = out.split("\r\n\r\n").nth(1).expect("a body");
    error_of(StatusCode::SERVICE_UNAVAILABLE, body, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("too_many_connections"), "{body}");
    // A slot frees when a connection closes.
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let r = raw_get(addr, "/v1/models").await;
        if r.starts_with("HTTP/1.1 200") {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "a freed slot serves again");
    drop(held);
    let _ = stop.send(());
    server.await.expect("server task").expect("server");
}

/// A stage that perturbs, by a relative 1e-3, the hidden states of every one-position step it
/// forwards from its 6th on, and the copies a tap sends the origin alike.
async fn lying_stage(shard: Shard, config: StageConfig) -> Node {
    let node = Node::bind(NodeOptions::loopback()).await.expect("stage");
    let mut forwarded = 0usize;
    let mut lied = std::collections::HashSet::new();
    let perturb = |bytes: &mut [u8]| {
        for c in bytes.chunks_exact_mut(4) {
            let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * 1.001;
            c.copy_from_slice(&v.to_le_bytes());
        }
    };
    let tamper = move |actions: &mut Vec<shoal_worker::service::Action>| {
        use shoal_worker::protocol::{Message, Payload};
        use shoal_worker::service::Action;
        for a in actions.iter_mut() {
            if let Action::ToNext { msg: Message::Step(s), .. } = a
                && let Payload::Hidden(h) = &mut s.payload
                && h.t == 1
            {
                if forwarded >= 5 {
                    perturb(&mut h.bytes);
                    lied.insert((s.session_id, s.step_id));
                }
                forwarded += 1;
            }
        }
        for a in actions.iter_mut() {
            if let Action::ToOrigin { msg: Message::StageOutput(o), .. } = a
                && lied.contains(&(o.session_id, o.step_id))
            {
                perturb(&mut o.hidden.bytes);
            }
        }
    };
    assert!(node.serve_tampered(StageService::new(shard, config), tamper));
    node
}

/// An API whose route runs through a stage that starts lying mid-generation (it announces
/// itself as the fastest replica of 0..15); a quarter of the steps are checked, the origin's
/// weights break ties.
async fn lying_fixture() -> (axum::Router, Vec<Node>) {
    use shoal_coordinator_free_router::driver::LocalWeights;
    use shoal_coordinator_free_router::swarm::announce::{Announcement, PeerState};
    use shoal_coordinator_free_router::verify::SpotCheckConfig;
    let model = Model::open(model_path()).expect("model");
    let info = ModelInfo::of(&model).expect("model info");
    let origin = Node::bind(NodeOptions::loopback()).await.expect("origin");
    let config = DriverConfig {
        spot_check: SpotCheckConfig { share: 0.25, ..SpotCheckConfig::default() },
        ..DriverConfig::default()
    };
    let driver = Driver::new(origin, info, config);
    driver.set_local_weights(LocalWeights::new(Model::open(model_path()).expect("model")));
    let stage_config = stage_config(&info);
    let shard = |span| Shard::load(&model, span, &Device::Cpu, DType::F32).expect("span");
    let honest = Node::bind(NodeOptions::loopback()).await.expect("stage");
    honest.serve(StageService::new(shard(0..15), stage_config.clone()));
    let liar = lying_stage(shard(0..15), stage_config.clone()).await;
    let last = Node::bind(NodeOptions::loopback()).await.expect("stage");
    last.serve(StageService::new(shard(15..30), stage_config));
    let announce = |node: &Node, start: u32, end: u32, throughput: f32| Announcement {
        node: shoal_worker::net::peer_id(&node.endpoint_id()),
        model: info.model_id,
        n_layers: 30,
        start,
        end,
        state: PeerState::Serving,
        throughput,
        load: 0,
        free_kv_bytes: 1 << 30,
        version: "0.1.0".into(),
        seq: 1,
        issued_at_ms: 0,
        ttl_ms: 60_000,
        addrs: node.addr().ip_addrs().copied().collect(),
        holds: Default::default(),
    };
    let view = [announce(&honest, 0, 15, 1.0), announce(&liar, 0, 15, 1e6), announce(&last, 15, 30, 1e3)];
    assert_eq!(driver.sync_view(&view).len(), 3);
    driver.refresh().await;
    let served = ServedModel::of(&model, "smollm2").expect("tokenizer and template");
    let state = Arc::new(ApiState::new(Arc::new(driver), served, ApiConfig::default()).expect("metrics"));
    (router(state), vec![honest, liar, last])
}

/// The withdrawn tokens counted in `app`'s metrics.
async fn withdrawn(app: &axum::Router) -> f64 {
    let (s, text) = call(app, "GET", "/metrics", None).await;
    assert_eq!(s, StatusCode::OK);
    text.lines()
        .find(|l| l.starts_with("shoal_withdrawn_tokens_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .expect("the counter is exported")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_withdrawn_from_a_caught_liar_are_left_out_of_a_response_and_end_a_stream() {
    let body = |stream: bool| json!({"prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0, "stream": stream});
    let honest = fixture(true).await;
    let (s, b) = call(&honest.app, "POST", "/v1/completions", Some(body(false))).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let want = json_of(&b)["choices"][0]["text"].clone();
    // Whether tokens are left to withdraw when the liar is caught depends on the checks'
    // random draw: a few tries of each.
    let (mut whole, mut cut) = (false, false);
    for _ in 0..8 {
        if whole && cut {
            break;
        }
        let stream = whole;
        let (app, stages) = lying_fixture().await;
        let (s, b) = call(&app, "POST", "/v1/completions", Some(body(stream))).await;
        let n = withdrawn(&app).await;
        for node in stages {
            node.shutdown().await;
        }
        if n == 0.0 {
            continue;
        }
        if stream {
            // The stream had sent the withdrawn tokens: it ends with an error, not [DONE].
            assert_eq!(s, StatusCode::OK);
            let events = sse_data(&b);
            let last = json_of(events.last().expect("events"));
            assert_eq!(last["error"]["code"], "wrong_result", "{b}");
            assert!(!events.iter().any(|e| e == "[DONE]"), "{b}");
            cut = true;
        } else {
            // The whole response leaves them out: the text of an undisturbed run.
            assert_eq!(s, StatusCode::OK, "{b}");
            assert_eq!(json_of(&b)["choices"][0]["text"], want, "{b}");
            whole = true;
        }
    }
    assert!(whole && cut, "withdrawals seen: in a response {whole}, in a stream {cut}");
}
