//! The API on the nodes users run, as real processes on loopback: two `shoal worker`s
//! (0..15, and 15..30 with `--api`, joined through the first's ticket), and a `shoal api
//! --join` given only the first worker's ticket: both find the whole route in the swarm's
//! announcements. Each API answers `/health` once its route exists and gives `shoal
//! generate`'s greedy text.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

/// A `shoal` process, killed when dropped, with the lines it printed that start with the
/// asked prefixes.
struct Proc {
    child: Child,
    found: Vec<String>,
}

impl Proc {
    /// Starts `shoal args` and reads stdout until a line starts with each of `wait_for`.
    fn start(args: &[&str], wait_for: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(args)
            .env("SHOAL_THREADS", "1")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start shoal");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut found = Vec::new();
        for prefix in wait_for {
            let line = lines
                .by_ref()
                .map_while(Result::ok)
                .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
                .unwrap_or_else(|| panic!("shoal {args:?} never printed {prefix:?}"));
            found.push(line);
        }
        std::thread::spawn(move || for _ in lines {});
        Self { child, found }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `http://127.0.0.1:PORT/v1 (…)` → `127.0.0.1:PORT`.
fn host_of(listening: &str) -> String {
    listening.trim_start_matches("http://").split('/').next().expect("host").to_owned()
}

/// One HTTP/1.1 request; returns (status, body).
fn http(host: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, rest) = out.split_once("\r\n\r\n").expect("a response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    (status, rest.to_owned())
}

#[test]
fn worker_api_and_api_node_answer_like_generate() {
    let m = model();
    let m = m.to_str().expect("utf-8 path");
    let prompt = "The three primary colors are";
    let want = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["generate", "--model", m, "--prompt", prompt, "--max-tokens", "16", "--json"])
        .env("SHOAL_THREADS", "1")
        .output()
        .expect("shoal generate");
    assert!(want.status.success());
    let want: Value = serde_json::from_slice(&want.stdout).expect("one JSON line");

    let a = Proc::start(
        &["worker", "--model", m, "--layers", "0..15", "--bind", "127.0.0.1:0"],
        &["ticket: ", "ready: "],
    );
    let ticket_a = a.found[0].clone();
    let b = Proc::start(
        &[
            "worker",
            "--model",
            m,
            "--layers",
            "15..30",
            "--bind",
            "127.0.0.1:0",
            "--join",
            &ticket_a,
            "--api",
            "127.0.0.1:0",
        ],
        &["ticket: ", "ready: ", "listening: "],
    );
    // One ticket is enough: the API node finds the other worker in the swarm.
    let api =
        Proc::start(&["api", "--model", m, "--join", &ticket_a, "--listen", "127.0.0.1:0"], &["listening: "]);
    let body = json!({"prompt": prompt, "max_tokens": 16, "temperature": 0});
    for host in [host_of(&b.found[2]), host_of(&api.found[0])] {
        // Health turns 200 once both workers are known.
        let t0 = Instant::now();
        loop {
            let (status, text) = http(&host, "GET", "/health", None);
            if status == 200 {
                break;
            }
            assert_eq!(status, 503, "{text}");
            assert!(t0.elapsed() < Duration::from_secs(30), "no route after 30 s: {text}");
            std::thread::sleep(Duration::from_millis(200));
        }
        let (status, text) = http(&host, "POST", "/v1/completions", Some(&body));
        assert_eq!(status, 200, "{text}");
        let v: Value = serde_json::from_str(&text).expect("JSON");
        assert_eq!(v["choices"][0]["text"], want["text"], "{host}");
        assert_eq!(v["usage"]["completion_tokens"], json!(want["token_ids"].as_array().expect("ids").len()));
        let (status, metrics) = http(&host, "GET", "/metrics", None);
        assert_eq!(status, 200);
        assert!(metrics.contains("shoal_generation_tokens_total"), "{metrics}");
    }
}
