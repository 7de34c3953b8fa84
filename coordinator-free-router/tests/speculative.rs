//! Speculative decoding through the pipeline over real iroh endpoints on loopback, with the
//! real SmolLM2-135M (Q4_1): the tokens (and their logprobs) with `ngram` speculation are
//! those without, on one stage and on three, greedy and sampled, for text that repeats its
//! prompt (most drafts accepted) and for free-form text; stops and `max_tokens` cut at the
//! same token; a stage that leaves mid-generation is replaced and the replay keeps the tokens;
//! a draft model (`draft:PATH`) keeps them too.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo, Outcome, Request};
use shoal_coordinator_free_router::speculative::Speculation;
use shoal_model_shards::generate::{self, Flow};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, NodeOptions};
use shoal_worker::service::{StageConfig, StageService};

/// A prompt whose continuation quotes it.
const COPY: &str = "Copy the passage below exactly.\n\nPassage: The lighthouse keeper climbed the \
    stairs every evening at dusk, wound the clockwork, trimmed the wick and watched the beam \
    sweep across the dark water until morning.\n\nCopy: The lighthouse keeper climbed the";
/// A prompt whose continuation is free text.
const FREE: &str = "Write a short story about a robot who learns to paint.";

fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

fn model() -> Model {
    Model::open(model_path()).expect("SmolLM2 opens")
}

async fn stage(model: &Model, span: Range<usize>) -> Node {
    let shard = Shard::load(model, span, &Device::Cpu, DType::F32).expect("span loads");
    let config = StageConfig {
        max_sessions: 16,
        kv_budget_bytes: 256 << 20,
        per_peer_sessions: 16,
        per_forwarder_sessions: 64,
        idle_timeout: Duration::from_secs(60),
        max_seq_len: 1024,
        model_id: model.model_id().expect("model id"),
    };
    let node = Node::bind(NodeOptions::loopback()).await.expect("endpoint binds");
    assert!(node.serve(StageService::new(shard, config)));
    node
}

async fn driver_for(model: &Model, stages: &[&Node]) -> Driver {
    let origin = Node::bind(NodeOptions::loopback()).await.expect("origin binds");
    let config = DriverConfig {
        step_timeout: Duration::from_secs(20),
        ping_timeout: Duration::from_millis(500),
        ..DriverConfig::default()
    };
    let d = Driver::new(origin, ModelInfo::of(model).expect("model info"), config);
    for s in stages {
        d.add_peer(s.addr()).await.expect("peer answers");
    }
    d
}

fn prompt(model: &Model, text: &str) -> Vec<u32> {
    model.tokenizer().expect("tokenizer").encode(text, true).expect("encodes")
}

fn sampled() -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        repetition_penalty: 1.05,
        seed: 99,
        ..SamplingParams::default()
    }
}

fn request(prompt: &[u32], params: SamplingParams, max_tokens: usize) -> Request {
    Request {
        prompt: prompt.to_vec(),
        params,
        max_tokens,
        stop_ids: vec![],
        top_logprobs: 2,
        constraint: None,
    }
}

async fn run(d: &Driver, r: &Request, mode: Speculation) -> Outcome {
    d.generate_with(r, mode, |_| Flow::Continue).await.expect("generation")
}

/// Same tokens, same logprob bits, one step per token without speculation.
fn assert_same(off: &Outcome, ngram: &Outcome, what: &str) {
    assert_eq!(ngram.tokens, off.tokens, "{what}: tokens");
    let bits = |o: &Outcome| o.logprobs.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(ngram), bits(off), "{what}: logprobs");
    assert_eq!(off.speculation.drafts, 0, "{what}: no drafts when off");
    assert_eq!(off.step_times.len() + 1, off.tokens.len(), "{what}: one round trip per token when off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ngram_speculation_keeps_the_tokens_on_one_and_three_stages() {
    let model = model();
    let n = model.spec().n_layers;
    let (copy, free) = (prompt(&model, COPY), prompt(&model, FREE));
    let local = |p: &[u32], params: &SamplingParams, max: usize| {
        let whole = Shard::load(&model, 0..n, &Device::Cpu, DType::F32).expect("loads");
        generate::generate(std::slice::from_ref(&whole), p, params, max, &[], |_| Flow::Continue)
            .expect("local generation")
            .token_ids
    };
    let want_copy = local(&copy, &SamplingParams::greedy(), 40);
    #[allow(clippy::single_range_in_vec_init)] // one stage holding every layer
    let splits: [Vec<Range<usize>>; 2] = [vec![0..n], vec![0..n / 3, n / 3..2 * n / 3, 2 * n / 3..n]];
    for spans in splits {
        let mut nodes = Vec::new();
        for span in &spans {
            nodes.push(stage(&model, span.clone()).await);
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        let d = driver_for(&model, &refs).await;
        for (name, p, params) in [
            ("copy, greedy", &copy, SamplingParams::greedy()),
            ("free, greedy", &free, SamplingParams::greedy()),
            ("copy, sampled", &copy, sampled()),
            ("free, sampled", &free, sampled()),
        ] {
            let r = request(p, params, 40);
            let off = run(&d, &r, Speculation::Off).await;
            let ngram = run(&d, &r, Speculation::Ngram).await;
            let what = format!("{name} through {spans:?}");
            assert_same(&off, &ngram, &what);
            eprintln!(
                "{what}: {} tokens in {} round trips; drafted {} ids in {} steps, {} accepted",
                ngram.tokens.len(),
                ngram.step_times.len() + 1,
                ngram.speculation.draft_tokens,
                ngram.speculation.drafts,
                ngram.speculation.accepted_tokens
            );
            if name == "copy, greedy" {
                assert_eq!(ngram.tokens, want_copy, "{what}: the tokens of local generation");
                // The copy is drafted from the prompt: most tokens come in batches.
                assert!(
                    ngram.speculation.accepted_tokens * 2 >= ngram.tokens.len(),
                    "{what}: {:?}",
                    ngram.speculation
                );
                assert!(ngram.step_times.len() * 2 < off.step_times.len(), "{what}: fewer round trips");
            }
        }
        d.node().shutdown().await;
        for node in &nodes {
            node.shutdown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stops_and_max_tokens_cut_at_the_same_token_with_speculation() {
    let model = model();
    let n = model.spec().n_layers;
    let node = stage(&model, 0..n).await;
    let d = driver_for(&model, &[&node]).await;
    let copy = prompt(&model, COPY);
    let base = run(&d, &request(&copy, SamplingParams::greedy(), 48), Speculation::Off).await;
    assert_eq!(base.tokens.len(), 48);
    for max in [1, 2, 7, 23] {
        let r = request(&copy, SamplingParams::greedy(), max);
        let ngram = run(&d, &r, Speculation::Ngram).await;
        assert_eq!(ngram.tokens, base.tokens[..max], "max_tokens {max}");
    }
    // A stop id in the middle of a draft that the stage accepts.
    let mut r = request(&copy, SamplingParams::greedy(), 48);
    r.stop_ids = vec![base.tokens[20]];
    let first = base.tokens.iter().position(|&t| t == base.tokens[20]).expect("present");
    let off = run(&d, &r, Speculation::Off).await;
    let ngram = run(&d, &r, Speculation::Ngram).await;
    assert_eq!(off.tokens, base.tokens[..first]);
    assert_eq!(ngram.tokens, off.tokens);
    // A client that stops after token 17 (a stop string, a closed stream) sees 18 tokens.
    let r = request(&copy, SamplingParams::greedy(), 48);
    let stopped = d
        .generate_with(&r, Speculation::Ngram, |ev| if ev.index == 17 { Flow::Stop } else { Flow::Continue })
        .await
        .expect("generation");
    assert_eq!(stopped.tokens, base.tokens[..18]);
    d.node().shutdown().await;
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_mid_speculation_replays_to_the_same_tokens() {
    let model = model();
    let n = model.spec().n_layers;
    let copy = prompt(&model, COPY);
    let a = stage(&model, 0..n / 2).await;
    let b1 = stage(&model, n / 2..n).await;
    let b2 = stage(&model, n / 2..n).await;
    let d = driver_for(&model, &[&a, &b1, &b2]).await;
    let r = request(&copy, sampled(), 40);
    let want = run(&d, &r, Speculation::Off).await;
    let b1_id = b1.id();
    let (mut b1, mut b2) = (Some(b1), Some(b2));
    let mut killed = None;
    let out = d
        .generate_with(&r, Speculation::Ngram, |ev| {
            if ev.index >= 15 && killed.is_none() {
                // Shut down this route's replica of the second half: it hands the session
                // back (`Draining`) and leaves.
                let victim = if ev.route.contains(&b1_id) { b1.take() } else { b2.take() };
                let victim = victim.expect("the route uses a replica");
                killed = Some(victim.id());
                tokio::spawn(async move { victim.shutdown().await });
            }
            Flow::Continue
        })
        .await
        .expect("generation survives");
    assert_eq!(out.tokens, want.tokens);
    let bits = |o: &Outcome| o.logprobs.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out), bits(&want));
    assert_eq!(out.failovers.len(), 1, "{:?}", out.failovers);
    assert!(!out.route.contains(&killed.expect("a replica was stopped")));
    assert!(out.speculation.accepted_tokens > 0, "{:?}", out.speculation);
    eprintln!("replayed after token {}: {:?}", out.failovers[0].at_token, out.speculation);
}

/// `draft:PATH`: a draft model on the origin (here SmolLM2 itself, so that greedy drafts are
/// the target's own choices) keeps the tokens and logprobs of ordinary decoding through three
/// stages, greedy and sampled, and drafts free-form text that n-grams cannot; a draft model
/// with another vocabulary is refused with the request, naming both sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draft_model_keeps_the_tokens_and_drafts_free_text() {
    let model = model();
    let n = model.spec().n_layers;
    let draft: Speculation =
        format!("draft:{}", model_path().display()).parse().expect("the draft model loads");
    assert_eq!(draft.name(), "draft");
    let mut nodes = Vec::new();
    for span in [0..n / 3, n / 3..2 * n / 3, 2 * n / 3..n] {
        nodes.push(stage(&model, span).await);
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    let d = driver_for(&model, &refs).await;
    let free = prompt(&model, FREE);
    for (name, params) in [("free, greedy", SamplingParams::greedy()), ("free, sampled", sampled())] {
        let r = request(&free, params, 40);
        let off = run(&d, &r, Speculation::Off).await;
        let drafted = run(&d, &r, draft.clone()).await;
        assert_same(&off, &drafted, name);
        let ngram = run(&d, &r, Speculation::Ngram).await;
        let s = drafted.speculation;
        eprintln!(
            "{name}: {} tokens in {} round trips with the draft model ({} of {} ids accepted), {} with ngram",
            drafted.tokens.len(),
            drafted.step_times.len() + 1,
            s.accepted_tokens,
            s.draft_tokens,
            ngram.step_times.len() + 1
        );
        assert!(s.drafts > 0, "{name}: {s:?}");
        if name == "free, greedy" {
            // The target's own greedy choices: (nearly) every draft id is kept.
            assert!(s.accepted_tokens * 10 >= s.draft_tokens * 9, "{name}: {s:?}");
            assert!(
                drafted.step_times.len() * 3 < off.step_times.len(),
                "{name}: a third of the round trips"
            );
            assert!(drafted.step_times.len() < ngram.step_times.len(), "{name}: fewer than n-gram drafts");
        }
    }
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny_gguf/qwen3moe.gguf");
    let other: Speculation = format!("draft:{}", fixture.display()).parse().expect("the fixture loads");
    let err = d
        .generate_with(&request(&free, SamplingParams::greedy(), 4), other, |_| Flow::Continue)
        .await
        .expect_err("another vocabulary");
    let msg = err.to_string();
    assert!(msg.contains("qwen3moe.gguf") && msg.contains("the model 49152"), "{msg}");
    d.node().shutdown().await;
    for node in &nodes {
        node.shutdown().await;
    }
}
