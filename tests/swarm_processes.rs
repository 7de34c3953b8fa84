//! The swarm as volunteers run it, offline on loopback with the real model: five `shoal
//! worker --layers auto --num-layers 10` processes join one by one through the first one's
//! ticket and place themselves; `shoal status` sees all 30 layers covered; `shoal generate
//! --join` (one ticket, the route found in the swarm) prints `shoal generate`'s ids. Then two
//! workers stop, one of them the only holder of some layers: the others notice the hole from
//! the gossip, one moves to fill it, coverage heals and generation still gives the same ids.

#[path = "support/worker_ready.rs"]
mod worker_ready;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Seconds between announcements in this test (ttl: three of them).
const INTERVAL: &str = "0.5";

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

fn model_str() -> String {
    model().to_str().expect("utf-8 path").to_owned()
}

/// A `shoal worker --layers auto` process, killed when dropped; its stdout lines are kept.
struct Worker {
    child: Child,
    ticket: String,
    id: String,
    out: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(join: Option<&str>) -> Self {
        let m = model_str();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
        cmd.args(["worker", "--model", &m, "--layers", "auto", "--num-layers", "10"])
            .args(["--bind", "127.0.0.1:0", "--announce-interval", INTERVAL, "--rebalance-interval", "2"])
            .args(["--drain-timeout", "0.5"])
            .env("SHOAL_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(t) = join {
            cmd.args(["--join", t]);
        }
        let mut child = cmd.spawn().expect("start a worker");
        let (ticket, id, lines) = worker_ready::read_ready(child.stdout.take().expect("stdout"));
        let out = Arc::new(Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().expect("lines").push(line);
            }
        });
        Self { child, ticket, id, out }
    }

    fn stop(mut self) {
        let ok = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(ok.success());
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "a worker stopped by SIGTERM exits cleanly: {status}");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `shoal status --json` as seen through `ticket`.
fn status(ticket: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args([
            "status",
            "--join",
            ticket,
            "--json",
            "--bind",
            "127.0.0.1:0",
            "--announce-interval",
            INTERVAL,
        ])
        .output()
        .expect("shoal status");
    assert!(out.status.success(), "shoal status: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert_eq!(text.trim_end().lines().count(), 1, "one line: {text}");
    serde_json::from_str(&text).expect("JSON")
}

/// (id, start, end) of the serving peers.
fn serving(status: &Value) -> Vec<(String, u64, u64)> {
    let mut v: Vec<_> = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .filter(|p| p["state"] == "serving")
        .map(|p| {
            (
                p["id"].as_str().expect("id").to_owned(),
                p["start"].as_u64().expect("start"),
                p["end"].as_u64().expect("end"),
            )
        })
        .collect();
    v.sort_by_key(|(id, s, e)| (*s, *e, id.clone()));
    v
}

/// How many serving peers hold each of the 30 layers.
fn holders(peers: &[(String, u64, u64)]) -> Vec<usize> {
    (0..30u64).map(|l| peers.iter().filter(|(_, s, e)| *s <= l && l < *e).count()).collect()
}

/// Polls `shoal status` until `ok` holds of the serving peers.
fn wait_for(
    ticket: &str,
    what: &str,
    timeout: Duration,
    ok: impl Fn(&[(String, u64, u64)]) -> bool,
) -> Value {
    let t0 = Instant::now();
    loop {
        let s = status(ticket);
        if ok(&serving(&s)) {
            return s;
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}; last status: {s}");
    }
}

fn generate(join: Option<&str>) -> Value {
    let m = model_str();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.args([
        "generate",
        "--model",
        &m,
        "--prompt",
        "The three primary colors are",
        "--max-tokens",
        "24",
        "--json",
    ])
    .env("SHOAL_THREADS", "1");
    if let Some(t) = join {
        cmd.args(["--join", t, "--bind", "127.0.0.1:0", "--announce-interval", INTERVAL]);
    }
    let out = cmd.output().expect("shoal generate");
    assert!(out.status.success(), "shoal generate: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn five_auto_workers_cover_the_model_and_heal_after_two_leave() {
    let want = generate(None);
    assert!(want["token_ids"].as_array().expect("ids").len() >= 10, "{want}");

    let first = Worker::start(None);
    let ticket = first.ticket.clone();
    let mut workers = vec![first];
    for _ in 1..5 {
        workers.push(Worker::start(Some(&ticket)));
    }
    // Placed where the swarm was weakest, one after the other: every layer is covered
    // (30 layers by 5 spans of 10 leaves 20 layer-slots of replicas).
    let s = wait_for(&ticket, "5 serving peers covering 30 layers", Duration::from_secs(60), |p| {
        p.len() == 5 && holders(p).iter().all(|&h| h >= 1)
    });
    assert_eq!(s["n_layers"], 30);
    let peers = serving(&s);
    eprintln!("placement: {peers:?}");
    for (_, start, end) in &peers {
        assert_eq!(end - start, 10, "{peers:?}");
    }
    let got = generate(Some(&ticket));
    assert_eq!(got["token_ids"], want["token_ids"], "through the swarm");
    assert_eq!(got["text"], want["text"]);

    // Stop a worker that alone holds some layer, and another one.
    let h = holders(&peers);
    let alone = peers
        .iter()
        .find(|(_, s, e)| (*s..*e).any(|l| h[l as usize] == 1))
        .expect("with 50 layer-slots over 30 layers some layer has one holder")
        .0
        .clone();
    let other = peers.iter().map(|p| p.0.clone()).find(|id| *id != alone).expect("another");
    for id in [&alone, &other] {
        let i = workers.iter().position(|w| &w.id == id).expect("a worker of ours");
        workers.remove(i).stop();
    }
    // Status and generate join through a worker that is still there.
    let ticket = workers[0].ticket.clone();
    let t0 = Instant::now();
    let s = wait_for(&ticket, "3 serving peers covering 30 layers again", Duration::from_secs(90), |p| {
        p.len() == 3 && holders(p).iter().all(|&h| h >= 1)
    });
    eprintln!("healed in {:.1?}: {:?}", t0.elapsed(), serving(&s));
    let moved: Vec<String> = workers
        .iter()
        .flat_map(|w| w.out.lock().expect("lines").clone())
        .filter(|l| l.starts_with("moved: "))
        .collect();
    assert!(!moved.is_empty(), "a worker moved to fill the hole");
    eprintln!("{}", moved.join("\n"));
    let got = generate(Some(&ticket));
    assert_eq!(got["token_ids"], want["token_ids"], "after healing");
    for w in workers {
        w.stop();
    }
}
