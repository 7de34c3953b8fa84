//! A private swarm as operators run it, offline on loopback with the real model and the real
//! `shoal` binary: `shoal swarm new-key` writes two keys; two workers holding the first key
//! serve the model's two halves and `shoal generate --join --swarm-key` through them prints
//! the ids of a local `shoal generate`. Nodes without the key, and nodes with the other key,
//! are refused with "this swarm is private: ..." (`worker`, `status`, `generate`), and two
//! such nodes running their own swarms, handed to members as extra tickets, never appear in
//! a member's view nor on a route.

#[path = "support/worker_ready.rs"]
mod worker_ready;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// Seconds between announcements in this test (ttl: three of them).
const INTERVAL: &str = "0.5";

fn model() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p.to_str().expect("utf-8 path").to_owned()
}

fn shoal() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    cmd.env("SHOAL_THREADS", "1").env_remove("SHOAL_SWARM_KEY").env_remove("SHOAL_CONFIG");
    cmd
}

/// A `shoal worker` process, killed when dropped.
struct Worker {
    child: Child,
    ticket: String,
    id: String,
}

impl Worker {
    fn start(layers: &str, key: Option<&Path>, join: Option<&str>) -> Self {
        let mut cmd = shoal();
        cmd.args(["worker", "--model", &model(), "--layers", layers])
            .args(["--bind", "127.0.0.1:0", "--announce-interval", INTERVAL])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(k) = key {
            cmd.arg("--swarm-key").arg(k);
        }
        if let Some(t) = join {
            cmd.args(["--join", t]);
        }
        let mut child = cmd.spawn().expect("start a worker");
        let (ticket, id, lines) = worker_ready::read_ready(child.stdout.take().expect("stdout"));
        // Keep reading so the worker never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
        Self { child, ticket, id }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn with_key(cmd: &mut Command, key: Option<&Path>) {
    if let Some(k) = key {
        cmd.arg("--swarm-key").arg(k);
    }
}

fn generate(key: Option<&Path>, join: &[&str]) -> Output {
    let mut cmd = shoal();
    cmd.args(["generate", "--model", &model(), "--prompt", "The three primary colors are"]).args([
        "--max-tokens",
        "16",
        "--json",
    ]);
    if !join.is_empty() {
        cmd.args(["--bind", "127.0.0.1:0", "--announce-interval", INTERVAL, "--route-wait", "30"]);
        for t in join {
            cmd.args(["--join", t]);
        }
    }
    with_key(&mut cmd, key);
    cmd.output().expect("shoal generate")
}

fn status(key: Option<&Path>, join: &[&str]) -> Output {
    let mut cmd = shoal();
    cmd.args(["status", "--json", "--bind", "127.0.0.1:0", "--announce-interval", INTERVAL]);
    for t in join {
        cmd.args(["--join", t]);
    }
    with_key(&mut cmd, key);
    cmd.output().expect("shoal status")
}

fn ok_json(what: &str, out: &Output) -> Value {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// The ids in a `shoal status --json` line.
fn ids(status: &Value) -> Vec<String> {
    let mut v: Vec<String> = status["peers"]
        .as_array()
        .expect("peers")
        .iter()
        .map(|p| p["id"].as_str().expect("id").to_owned())
        .collect();
    v.sort();
    v
}

/// Asserts that `out` failed with the private swarm's refusal.
fn refused(what: &str, out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "{what} should be refused; stdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(stderr.contains("this swarm is private: "), "{what}: {stderr}");
}

#[test]
fn members_generate_and_outsiders_are_refused_and_never_seen() {
    let dir = std::env::temp_dir().join(format!("shoal-private-swarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (key, other) = (dir.join("swarm.key"), dir.join("other.key"));
    for k in [&key, &other] {
        let out = shoal().args(["swarm", "new-key"]).arg(k).output().expect("shoal swarm new-key");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(k).expect("key").permissions().mode() & 0o777, 0o600);
        }
    }
    assert_ne!(std::fs::read(&key).expect("key"), std::fs::read(&other).expect("key"));
    let again = shoal().args(["swarm", "new-key"]).arg(&key).output().expect("shoal swarm new-key");
    assert!(!again.status.success(), "an existing key is never overwritten");

    let want = ok_json("local generate", &generate(None, &[]));
    assert!(want["token_ids"].as_array().expect("ids").len() >= 8, "{want}");

    // The private swarm: two halves of the model.
    let a = Worker::start("0..15", Some(&key), None);
    let b = Worker::start("15..30", Some(&key), Some(&a.ticket));
    let mut members = vec![a.id.clone(), b.id.clone()];
    members.sort();
    let got = ok_json("a member's generate", &generate(Some(&key), &[&a.ticket]));
    assert_eq!(got["token_ids"], want["token_ids"], "through the private swarm");

    // Outsiders joining through a member are refused with the reason.
    let open_worker = shoal()
        .args(["worker", "--model", &model(), "--layers", "0..30", "--join", &a.ticket])
        .args(["--bind", "127.0.0.1:0", "--announce-interval", INTERVAL])
        .output()
        .expect("worker");
    refused("a worker without the key", &open_worker);
    let mut cmd = shoal();
    cmd.args(["worker", "--model", &model(), "--layers", "0..30", "--join", &b.ticket]).args([
        "--bind",
        "127.0.0.1:0",
        "--announce-interval",
        INTERVAL,
    ]);
    with_key(&mut cmd, Some(&other));
    refused("a worker with another key", &cmd.output().expect("worker"));
    refused("status without the key", &status(None, &[&a.ticket]));
    refused("status with another key", &status(Some(&other), &[&a.ticket]));
    refused("generate without the key", &generate(None, &[&a.ticket]));
    refused("generate with another key", &generate(Some(&other), &[&b.ticket]));

    // Two outsiders serving every layer in swarms of their own (open, and the other key).
    // Handed to members as extra tickets, they are neither in a member's view nor on a route.
    let open = Worker::start("0..30", None, None);
    let stranger = Worker::start("0..30", Some(&other), None);
    let all = [a.ticket.as_str(), open.ticket.as_str(), stranger.ticket.as_str()];
    let seen = ok_json("a member's status", &status(Some(&key), &all));
    assert_eq!(ids(&seen), members, "only members in the view: {seen}");
    let through_b = ok_json("a member's status through B", &status(Some(&key), &[&b.ticket]));
    assert_eq!(ids(&through_b), members, "{through_b}");
    let got = ok_json("a member's generate with outsiders' tickets", &generate(Some(&key), &all));
    assert_eq!(got["token_ids"], want["token_ids"]);
    // The outsiders' swarms hold only themselves.
    let theirs = ok_json("the open swarm's status", &status(None, &[&open.ticket]));
    assert_eq!(ids(&theirs), vec![open.id.clone()], "{theirs}");
    let theirs = ok_json("the other key's status", &status(Some(&other), &[&stranger.ticket]));
    assert_eq!(ids(&theirs), vec![stranger.id.clone()], "{theirs}");
    let _ = std::fs::remove_dir_all(&dir);
}
