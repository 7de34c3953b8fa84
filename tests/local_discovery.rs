//! `--discovery local`: shoal nodes on one local network find each other with mDNS, no
//! ticket given. The test builds a private network namespace (two veth ends with
//! multicast and a default route between them, nothing reaching beyond this machine) and runs, inside it, two workers
//! (0..15 and 15..30) started without `--join`; `shoal status --discovery local` lists both
//! and `shoal generate --discovery local` prints `shoal generate`'s ids through them.
//!
//! Needs root and `ip netns` (iproute2), as CI has; it fails, not skips, without them.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

fn model() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p.to_str().expect("utf-8 path").to_owned()
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run `ip` (iproute2 is needed)");
    assert!(
        out.status.success(),
        "ip {args:?} failed (this test needs root and network namespaces): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a veth pair (10.77.0.1 and 10.77.0.2, multicast on), deleted
/// when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = format!("shoal-mdns-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let ns = Self(name);
        let n = ns.0.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "link", "add", "va", "type", "veth", "peer", "name", "vb"]);
        ip(&["-n", n, "addr", "add", "10.77.0.1/24", "dev", "va"]);
        ip(&["-n", n, "addr", "add", "10.77.0.2/24", "dev", "vb"]);
        ip(&["-n", n, "link", "set", "va", "up", "multicast", "on"]);
        ip(&["-n", n, "link", "set", "vb", "up", "multicast", "on"]);
        // mDNS sends to 224.0.0.251 through the default route's interface; this one stays
        // inside the namespace.
        ip(&["-n", n, "route", "add", "default", "dev", "va"]);
        ns
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0, env!("CARGO_BIN_EXE_shoal")]).args(args).env("SHOAL_THREADS", "1");
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A worker in the namespace, killed when dropped.
struct Worker(Child);

impl Worker {
    fn start(ns: &Netns, layers: &str) -> Self {
        let m = model();
        let mut child = ns
            .command(&["worker", "--model", &m, "--layers", layers, "--discovery", "local"])
            .args(["--announce-interval", "0.5"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start a worker");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut ready = false;
        let mut lines = lines.map_while(Result::ok);
        for line in lines.by_ref() {
            if line.starts_with("ready: ") {
                ready = true;
                break;
            }
        }
        assert!(ready, "the worker for {layers} never got ready");
        std::thread::spawn(move || for _ in lines {});
        Self(child)
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn json(mut c: Command) -> Value {
    let out = c.output().expect("run shoal");
    assert!(out.status.success(), "{c:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn nodes_on_one_network_find_each_other_without_tickets() {
    let m = model();
    let prompt = ["--model", &m, "--prompt", "The three primary colors are", "--max-tokens", "16", "--json"];
    let mut local = Command::new(env!("CARGO_BIN_EXE_shoal"));
    local.arg("generate").args(prompt).env("SHOAL_THREADS", "1");
    let want = json(local);

    let ns = Netns::new();
    let _a = Worker::start(&ns, "0..15");
    let _b = Worker::start(&ns, "15..30");

    let t0 = std::time::Instant::now();
    loop {
        let status =
            json(ns.command(&["status", "--discovery", "local", "--json", "--announce-interval", "0.5"]));
        let mut spans: Vec<(u64, u64)> = status["peers"]
            .as_array()
            .expect("peers")
            .iter()
            .map(|p| (p["start"].as_u64().expect("start"), p["end"].as_u64().expect("end")))
            .collect();
        spans.sort_unstable();
        if spans == [(0, 15), (15, 30)] {
            break;
        }
        assert!(t0.elapsed().as_secs() < 60, "the workers never found each other: {status}");
    }
    let mut remote = ns.command(&["generate", "--discovery", "local", "--announce-interval", "0.5"]);
    remote.args(prompt);
    let got = json(remote);
    assert_eq!(got["token_ids"], want["token_ids"]);
    assert_eq!(got["text"], want["text"]);
}
