//! The dashboard as a person opens it: headless Chromium (Debian's `chromium`) loads
//! `/dashboard` from a live 3-stage `shoal run --listen`, runs the page's script against the
//! node, and the rendered page shows the three members and their spans, full coverage, the
//! tokens generated, and the chat box's answer from the node's own API. A screenshot is kept
//! in the target directory (`target/tmp/dashboard.png`).

#[path = "support/api_server.rs"]
mod api_server;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use api_server::ApiServer;
use serde_json::{Value, json};

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

fn request(host: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
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
    (head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status"), rest.to_owned())
}

/// Headless Chromium on `url`, with `args` (`--dump-dom`, `--screenshot=...`).
fn chromium(url: &str, args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"])
        .args(["--window-size=1280,1000", "--virtual-time-budget=15000"])
        .args(args)
        .arg(url)
        .output()
        .expect("run chromium (Debian's `chromium` package; .ci/run installs it)");
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_dashboard_shows_a_live_swarm_in_chromium() {
    let server = ApiServer::start(&model(), &["--stages", "3"], &[]);
    let host = server.url.trim_start_matches("http://").trim_end_matches("/v1").to_owned();
    // Some traffic for the counters.
    for _ in 0..2 {
        let (status, body) = request(
            &host,
            "POST",
            "/v1/completions",
            Some(&json!({"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})),
        );
        assert_eq!(status, 200, "{body}");
    }
    // The state the page polls, once the sampler has seen the requests.
    std::thread::sleep(Duration::from_millis(2500));
    let (status, body) = request(&host, "GET", "/dashboard/state", None);
    assert_eq!(status, 200, "{body}");
    let state: Value = serde_json::from_str(&body).expect("JSON state");
    let spans: Vec<(u64, u64)> = state["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| (m["start"].as_u64().expect("start"), m["end"].as_u64().expect("end")))
        .collect();
    assert_eq!(spans, [(0, 10), (10, 20), (20, 30)], "{state}");
    assert_eq!(state["coverage"].as_array().map(Vec::len), Some(30));
    assert_eq!(state["uncovered"], 0);
    assert_eq!(state["requests_total"], 2.0, "{state}");
    assert_eq!(state["tokens_total"], 24.0, "{state}");

    // The page, rendered by its script, with the chat box asking the node.
    let url = format!("http://{host}/dashboard?ask=Name%20a%20fruit.");
    let dom = chromium(&url, &["--dump-dom"]);
    for span in ["0..10", "10..20", "20..30"] {
        assert!(dom.contains(&format!("data-span=\"{span}\"")), "no member row for {span}:\n{dom}");
    }
    assert!(dom.contains("3 peers · all 30 layers covered"), "{dom}");
    assert_eq!(dom.matches("class=\"cell\"").count(), 30, "one coverage cell per layer:\n{dom}");
    assert!(dom.contains("id=\"tokens-total\">"), "{dom}");
    let tokens =
        dom.split("id=\"tokens-total\">").nth(1).and_then(|r| r.split('<').next()).unwrap_or_default();
    let tokens: f64 = tokens.replace(',', "").parse().unwrap_or(0.0);
    assert!(tokens >= 24.0, "tokens generated shown as {tokens}");
    assert!(dom.contains("<polyline id=\"tok-line\""), "no chart:\n{dom}");
    assert!(dom.contains("data-done=\"ok\""), "the chat box got no answer:\n{dom}");

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(&url, &[&format!("--screenshot={}", shot.display())]);
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());
}
