//! The pipeline as users run it: real `shoal` processes on loopback, the real model.
//!
//! - `shoal run --stages N` (N = 1, 2, 3) prints the same ids as `shoal generate`.
//! - Three `shoal worker` processes (0..15, and 15..30 twice); this test is the origin. The
//!   replica in use is killed with SIGKILL halfway through a 100-token generation: the
//!   generation completes with the ids of an undisturbed run and the recovery time is
//!   printed. Then the other replica gets SIGTERM mid-generation: it drains, hands the
//!   session back, and exits cleanly; the ids are still the same.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::Deserialize;
use shoal_coordinator_free_router::driver::{Driver, DriverConfig, ModelInfo, Request};
use shoal_model_shards::generate::Flow;
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{Model, sampler};
use shoal_worker::net::{Node, NodeOptions, parse_ticket, peer_id};
use shoal_worker::service::PeerId;

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

#[derive(Deserialize, Debug)]
struct JsonLine {
    text: String,
    token_ids: Vec<u32>,
    finish_reason: String,
}

fn shoal_json(args: &[&str]) -> JsonLine {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(args)
        .env("SHOAL_THREADS", "2")
        .output()
        .expect("run shoal");
    assert!(out.status.success(), "shoal {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn run_with_1_2_and_3_stages_equals_generate() {
    let m = model();
    let m = m.to_str().expect("utf-8 path");
    for (prompt, chat) in [("The three primary colors are", false), ("Write a haiku about the sea.", true)] {
        let mut base = vec!["--model", m, "--prompt", prompt, "--max-tokens", "40", "--json"];
        if chat {
            base.push("--chat");
        }
        let mut gen_args = vec!["generate"];
        gen_args.extend(&base);
        let want = shoal_json(&gen_args);
        assert!(want.token_ids.len() >= 10, "{want:?}");
        for stages in ["1", "2", "3"] {
            let mut args = vec!["run", "--stages", stages];
            args.extend(&base);
            let got = shoal_json(&args);
            assert_eq!(got.token_ids, want.token_ids, "{stages} stages, prompt {prompt:?}");
            assert_eq!((&got.text, &got.finish_reason), (&want.text, &want.finish_reason));
        }
    }
}

/// A `shoal worker` process, killed when dropped.
struct Worker {
    child: Child,
    ticket: String,
    id: PeerId,
    stderr: std::thread::JoinHandle<String>,
}

impl Worker {
    fn start(layers: &str) -> Self {
        let m = model();
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["worker", "--model", m.to_str().expect("utf-8"), "--layers", layers])
            .args(["--bind", "127.0.0.1:0", "--drain-timeout", "0.2", "-v"])
            .env("SHOAL_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut ticket = None;
        for line in lines.by_ref() {
            let line = line.expect("worker stdout");
            if let Some(t) = line.strip_prefix("ticket: ") {
                ticket = Some(t.to_owned());
            }
            if line.starts_with("ready: ") {
                break;
            }
        }
        let ticket = ticket.expect("the worker prints a ticket before ready");
        let id = peer_id(&parse_ticket(&ticket).expect("a valid ticket").id);
        let mut err = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        std::thread::spawn(move || for _ in lines {});
        Self { child, ticket, id, stderr }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").args([sig, &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn killed_and_drained_workers_cost_latency_not_tokens() {
    let a = Worker::start("0..15");
    let b1 = Worker::start("15..30");
    let b2 = Worker::start("15..30");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let model = Model::open(model()).expect("model");
        let tokenizer = model.tokenizer().expect("tokenizer");
        let origin = Node::bind(NodeOptions::loopback()).await.expect("origin");
        let config = DriverConfig {
            step_timeout: Duration::from_secs(2),
            ping_timeout: Duration::from_millis(500),
            ..DriverConfig::default()
        };
        let d = Driver::new(origin, ModelInfo::of(&model).expect("model info"), config);
        for w in [&a, &b1, &b2] {
            d.add_peer(parse_ticket(&w.ticket).expect("ticket")).await.expect("worker answers");
        }
        let prompt =
            tokenizer.encode("Once upon a time, in a small village by the sea,", true).expect("encode");
        let params = SamplingParams { temperature: 0.7, top_p: 0.9, seed: 42, ..SamplingParams::default() };
        sampler::Sampler::new(params.clone()).expect("valid params");
        let request =
            Request { prompt, params, max_tokens: 100, stop_ids: vec![], top_logprobs: 0, constraint: None };

        let undisturbed = d.generate(&request, |_| Flow::Continue).await.expect("undisturbed run");
        assert_eq!(undisturbed.tokens.len(), 100);
        assert!(undisturbed.failovers.is_empty());

        // SIGKILL the replica in use at token 50.
        let mut killed = None;
        let out = d
            .generate(&request, |ev| {
                if ev.index == 50 {
                    let w = if ev.route.contains(&b1.id) { &b1 } else { &b2 };
                    w.signal("-KILL");
                    killed = Some(w.id);
                }
                Flow::Continue
            })
            .await
            .expect("the generation survives a SIGKILL");
        assert_eq!(out.tokens, undisturbed.tokens, "ids differ after failover");
        assert_eq!(out.failovers.len(), 1, "{:?}", out.failovers);
        let killed = killed.expect("killed a replica");
        assert!(!out.route.contains(&killed));
        let f = &out.failovers[0];
        eprintln!(
            "SIGKILL at token {}: {}; detected after {:.0?}, next token {:.0?} after the failed step began",
            f.at_token, f.reason, f.detection, f.stall
        );

        // SIGTERM the replica in use at token 30 (the survivor or a fresh one): it drains,
        // hands the session back at once and exits.
        let b3 = Worker::start("15..30");
        d.add_peer(parse_ticket(&b3.ticket).expect("ticket")).await.expect("new worker answers");
        let survivor = if killed == b1.id { &b2 } else { &b1 };
        let mut termed = None;
        let out = d
            .generate(&request, |ev| {
                if ev.index == 30 {
                    let w = if ev.route.contains(&survivor.id) { survivor } else { &b3 };
                    w.signal("-TERM");
                    termed = Some(w.id);
                }
                Flow::Continue
            })
            .await
            .expect("the generation survives a drain");
        assert_eq!(out.tokens, undisturbed.tokens, "ids differ after a drain");
        assert_eq!(out.failovers.len(), 1, "{:?}", out.failovers);
        let f = &out.failovers[0];
        assert!(f.reason.contains("Draining"), "{}", f.reason);
        eprintln!("SIGTERM at token {}: {}; stalled {:.0?}", f.at_token, f.reason, f.stall);
        d.node().shutdown().await;
        let termed = termed.expect("a replica got SIGTERM");
        let mut workers = [b1, b2, b3];
        let w = workers.iter_mut().find(|w| w.id == termed).expect("the termed worker");
        let status = wait_exit(&mut w.child, Duration::from_secs(10)).expect("a drained worker exits");
        assert!(status.success(), "{status:?}");
        let log =
            std::mem::replace(&mut w.stderr, std::thread::spawn(String::new)).join().unwrap_or_default();
        assert!(log.contains("draining") && log.contains("stopped"), "{log}");
    });
    drop(a);
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<std::process::ExitStatus> {
    let until = std::time::Instant::now() + within;
    while std::time::Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}
