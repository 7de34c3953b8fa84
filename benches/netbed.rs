//! shoal across emulated links: `shoal bench --join` against real `shoal worker` processes on
//! the hosts of the network test bed (shoal-netbed), for a matrix of one-way delay per egress,
//! random loss per egress and pipeline depth, each at several stream counts.
//!
//! For each cell a new bed of `stages + 1` hosts, every host with the same egress link: the
//! model split evenly into `stages` workers on hosts 0..stages, and `shoal bench` on the
//! last host as the origin (so one token crosses `stages + 1` links). Each worker and the
//! bench get one compute thread. The ping between the origin's host and host 0 is measured
//! too.
//!
//! Run it through `benches/netbed.sh`, which builds the delay program first, then plots the
//! result. Environment (comma-separated lists):
//! - `NETBED_DELAYS` (ms, default `0,5,25`), `NETBED_LOSS` (probability, default `0,0.01`),
//!   `NETBED_STAGES` (default `1,3`), `NETBED_CONCURRENCY` (default `1,8,32`);
//! - `NETBED_PROMPT_TOKENS` and `NETBED_GEN_TOKENS` (default 64 each), `NETBED_REPEAT`
//!   (`shoal bench --repeat`, default 1);
//! - `NETBED_BENCH_ARGS`: more `shoal bench` arguments, split at whitespace (for example
//!   `--workload copy --speculative ngram --compare-speculative`: each level off, then with
//!   n-gram drafts);
//! - `NETBED_WORKER_LOGS`: a directory for the workers' stderr (`worker-HOST-PID.log`;
//!   `RUST_LOG` sets what they log);
//! - `NETBED_OUT`: where the JSON results go (default `target/netbed.json`): one object per
//!   cell `{stages, delay_ms, loss, ping_ms, runs}`, `runs` as `shoal bench --json` gives them.
//!
//! Needs root, iproute2 and iptables (see shoal-netbed).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use shoal_netbed::{Bed, Link};

fn list<T: std::str::FromStr>(var: &str, default: &str) -> Vec<T> {
    let s = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    s.split(',').map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{var}: bad value {v:?}"))).collect()
}

fn model() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p.to_str().expect("utf-8 path").to_owned()
}

/// A worker process, killed when dropped.
struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the worker of `layers` on `host`; returns it and its ticket once it is ready.
fn worker(bed: &Bed, host: usize, layers: &str, join: Option<&str>) -> (Worker, String) {
    let m = model();
    let bind = format!("{}:0", bed.host(host).addr);
    let mut cmd = bed.command(host, env!("CARGO_BIN_EXE_shoal"));
    cmd.args(["worker", "--model", &m, "--layers", layers, "--bind", &bind, "--announce-interval", "0.5"])
        .args(["--max-sessions", "256", "--per-peer-sessions", "256"])
        .env("SHOAL_THREADS", "1")
        .stdout(Stdio::piped())
        .stderr(match std::env::var_os("NETBED_WORKER_LOGS") {
            Some(dir) => {
                let path = PathBuf::from(dir).join(format!("worker-{host}-{}.log", std::process::id()));
                Stdio::from(std::fs::File::create(&path).expect("create the worker's log"))
            }
            None => Stdio::null(),
        });
    if let Some(t) = join {
        cmd.args(["--join", t]);
    }
    let mut child = cmd.spawn().expect("start a worker");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut ticket = None;
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(t) = line.strip_prefix("ticket: ") {
            ticket = Some(t.to_owned());
        }
        if line.starts_with("ready: ") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    (Worker(child), ticket.expect("the worker printed a ticket before ready"))
}

/// One cell of the matrix.
fn cell(stages: usize, delay_ms: f64, loss: f64, concurrency: &str) -> Value {
    let link = Link { delay: Duration::from_secs_f64(delay_ms / 1e3), loss, rate_kbit: None };
    let bed = Bed::new(&vec![link; stages + 1]).expect("the test bed");
    let origin = stages;
    let ping = bed.ping(origin, 0, 5).expect("ping");
    let n_layers = 30;
    let mut workers = Vec::new();
    let mut ticket: Option<String> = None;
    for s in 0..stages {
        let layers = format!("{}..{}", s * n_layers / stages, (s + 1) * n_layers / stages);
        let (w, t) = worker(&bed, s, &layers, ticket.as_deref());
        workers.push(w);
        ticket.get_or_insert(t);
    }
    let ticket = ticket.expect("a worker");
    let m = model();
    let bind = format!("{}:0", bed.host(origin).addr);
    let gen_tokens = std::env::var("NETBED_GEN_TOKENS").unwrap_or_else(|_| "64".into());
    let prompt = std::env::var("NETBED_PROMPT_TOKENS").unwrap_or_else(|_| "64".into());
    let repeat = std::env::var("NETBED_REPEAT").unwrap_or_else(|_| "1".into());
    let out = bed
        .command(origin, env!("CARGO_BIN_EXE_shoal"))
        .args(["bench", "--model", &m, "--join", &ticket, "--bind", &bind, "--announce-interval", "0.5"])
        .args(["--route-wait", "60", "--concurrency", concurrency, "--gen-tokens", &gen_tokens])
        .args(["--prompt-tokens", &prompt, "--repeat", &repeat, "--json"])
        .args(std::env::var("NETBED_BENCH_ARGS").unwrap_or_default().split_whitespace())
        .env("SHOAL_THREADS", "1")
        .stderr(Stdio::inherit())
        .output()
        .expect("shoal bench");
    assert!(out.status.success(), "shoal bench failed in cell {stages} stages, {delay_ms} ms, loss {loss}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("shoal bench --json");
    drop(workers);
    json!({
        "stages": stages,
        "delay_ms": delay_ms,
        "loss": loss,
        "ping_ms": ping.avg.map(|d| d.as_secs_f64() * 1e3),
        "runs": report["runs"],
    })
}

fn main() {
    // `cargo bench` passes `--bench`; this harness takes no arguments.
    if let Some(what) = shoal_netbed::missing() {
        eprintln!("netbed bench: the test bed needs {what}");
        std::process::exit(1);
    }
    let delays: Vec<f64> = list("NETBED_DELAYS", "0,5,25");
    let losses: Vec<f64> = list("NETBED_LOSS", "0,0.01");
    let stages: Vec<usize> = list("NETBED_STAGES", "1,3");
    let concurrency = std::env::var("NETBED_CONCURRENCY").unwrap_or_else(|_| "1,8,32".into());
    let out = std::env::var("NETBED_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/netbed.json"));
    println!(
        "| stages | delay ms | loss | ping ms | streams | speculative | aggregate tok/s | per-stream tok/s | TTFT p50 ms | hop p50 ms | tok/step | failures |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut cells = Vec::new();
    for &s in &stages {
        for &loss in &losses {
            for &d in &delays {
                let c = cell(s, d, loss, &concurrency);
                let f = |v: &Value| v.as_f64().map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
                for r in c["runs"].as_array().expect("runs") {
                    println!(
                        "| {s} | {d} | {}% | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                        loss * 100.0,
                        f(&c["ping_ms"]),
                        r["concurrency"],
                        r["speculative"].as_str().unwrap_or("-"),
                        f(&r["aggregate_tok_s"]),
                        f(&r["per_stream_tok_s"]),
                        f(&r["ttft_ms_p50"]),
                        r["hop_ms_p50"].as_f64().map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                        r["tokens_per_step"].as_f64().map_or_else(|| "-".to_owned(), |v| format!("{v:.2}")),
                        r["failures"],
                    );
                }
                cells.push(c);
                std::fs::write(&out, serde_json::to_string_pretty(&cells).expect("JSON"))
                    .expect("write results");
            }
        }
    }
    eprintln!("results: {}", out.display());
}
