//! `shoal bench` as a user runs it (real processes, SmolLM2): against a local swarm of two
//! stages and against the API of a `shoal run --listen` process, `--json` prints exactly one
//! line with one run per concurrency level and the documented keys; bad input fails with a
//! clear message. No timing is asserted (the machine is shared), only the report's shape and
//! the consistency of its numbers.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::{Command, Output};

use api_server::ApiServer;
use serde_json::{Value, json};

const KEYS: [&str; 10] = [
    "concurrency",
    "aggregate_tok_s",
    "per_stream_tok_s",
    "ttft_ms_p50",
    "ttft_ms_p99",
    "hop_ms_p50",
    "failures",
    "speculative",
    "tokens_per_step",
    "draft_accept_rate",
];

fn model() -> PathBuf {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    model
}

fn bench(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("bench")
        .arg("--model")
        .arg(model())
        .args(args)
        .env("SHOAL_THREADS", "1")
        .env_remove("SHOAL_API_KEY")
        .output()
        .expect("run shoal bench")
}

/// Checks a successful `--json` run of levels 1 and 2 and returns its runs.
fn check_json(out: &Output) -> Vec<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "shoal bench failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints exactly one line:\n{stdout}");
    let v: Value = serde_json::from_str(lines[0]).expect("the line is JSON");
    let obj = v.as_object().expect("an object");
    assert_eq!(obj.keys().collect::<Vec<_>>(), ["runs"], "{v}");
    // serde_json's map sorts keys: check the line's own order on the text (first run).
    let at: Vec<usize> = KEYS.iter().map(|k| lines[0].find(&format!("\"{k}\":")).expect("key")).collect();
    assert!(at.is_sorted(), "the keys in the documented order: {}", lines[0]);
    let runs = v["runs"].as_array().expect("runs is a list").clone();
    assert_eq!(runs.len(), 2, "one run per concurrency level: {v}");
    for (run, concurrency) in runs.iter().zip([1, 2]) {
        let mut keys: Vec<&str> =
            run.as_object().expect("a run is an object").keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut documented = KEYS;
        documented.sort_unstable();
        assert_eq!(keys, documented, "the documented keys: {run}");
        assert_eq!(run["concurrency"], concurrency, "{run}");
        assert_eq!(run["failures"], 0, "{run}\nstderr:\n{stderr}");
        let num = |k: &str| run[k].as_f64().unwrap_or_else(|| panic!("{k} is a number: {run}"));
        assert!(num("aggregate_tok_s") > 0.0, "{run}");
        assert!(num("per_stream_tok_s") > 0.0, "{run}");
        assert!(num("ttft_ms_p50") > 0.0, "{run}");
        assert!(num("ttft_ms_p50") <= num("ttft_ms_p99"), "{run}");
    }
    runs
}

#[test]
fn bench_reports_a_local_swarm_and_an_api_as_one_json_line() {
    let workload = ["--prompt-tokens", "16", "--gen-tokens", "8", "--concurrency", "1,2", "--json"];

    let local = bench(&[&["--stages", "2"][..], &workload].concat());
    for run in check_json(&local) {
        let hop = run["hop_ms_p50"].as_f64().unwrap_or_else(|| panic!("hop_ms_p50 is a number: {run}"));
        assert!(hop > 0.0, "{run}");
        assert_eq!(run["speculative"], "off", "{run}");
        assert_eq!(run["tokens_per_step"], 1.0, "one token per round trip without speculation: {run}");
        assert!(run["draft_accept_rate"].is_null(), "nothing drafted: {run}");
    }

    let server = ApiServer::start(&model(), &["--stages", "2"], &[("SHOAL_THREADS", "1")]);
    let api = bench(&[&["--url", server.url.as_str()][..], &workload].concat());
    drop(server);
    for run in check_json(&api) {
        assert!(run["hop_ms_p50"].is_null(), "the API does not expose hops: {run}");
        assert_eq!(run["speculative"], "-", "{run}");
        assert!(run["tokens_per_step"].is_null(), "the API does not expose round trips: {run}");
    }
}

/// `--workload copy --compare-speculative`: each level runs with speculation off, then with
/// n-gram drafts; the copy-heavy prompt makes the drafts pay (more than one token per round
/// trip), and the ratios follow the table.
#[test]
fn bench_compares_speculation_on_a_copy_workload() {
    let args = ["--stages", "1", "--prompt-tokens", "48", "--gen-tokens", "24", "--concurrency", "1"];
    let spec = ["--workload", "copy", "--speculative", "ngram", "--compare-speculative"];
    let out = bench(&[&args[..], &spec, &["--json"]].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(stdout.trim()).expect("one JSON line");
    let runs = v["runs"].as_array().expect("runs");
    assert_eq!(runs.len(), 2, "off, then ngram: {v}");
    assert_eq!((&runs[0]["speculative"], &runs[1]["speculative"]), (&"off".into(), &"ngram".into()), "{v}");
    assert_eq!(runs[0]["tokens_per_step"], 1.0, "{v}");
    let per_step = runs[1]["tokens_per_step"].as_f64().expect("tokens_per_step");
    assert!(per_step > 1.0, "copying the prompt accepts drafts: {v}");
    let rate = runs[1]["draft_accept_rate"].as_f64().expect("draft_accept_rate");
    assert!(rate > 0.0 && rate <= 1.0, "{v}");

    // Without --json: the table, then a line of ratios per level.
    let out = bench(&[&args[..], &spec].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let ratio =
        stdout.lines().find(|l| l.starts_with("concurrency 1: ngram / off: aggregate ")).expect(&stdout);
    assert!(ratio.contains("tokens per round trip"), "{ratio}");

    // `--workload write`: a short chat prompt (the header names its length), new text.
    let out = bench(&["--stages", "1", "--gen-tokens", "8", "--concurrency", "1", "--workload", "write"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let header = stdout.lines().next().expect("a header");
    assert!(header.contains("tokens (Write)") && !header.contains("prompt 128 tokens"), "{header}");
}

#[test]
fn bench_refuses_bad_input_with_a_clear_message() {
    let cases: [(&[&str], &str); 7] = [
        (&["--stages", "2", "--concurrency", "0"], "at least 1"),
        (&["--stages", "2", "--concurrency", "a,b"], "`a` is not a number"),
        (&["--stages", "2", "--concurrency", ""], "empty"),
        (&["--stages", "2", "--url", "http://127.0.0.1:1/v1"], "cannot be used with"),
        (&["--concurrency", "1"], "required"),
        (&["--stages", "1", "--compare-speculative"], "give a mode other than off"),
        (
            &["--url", "http://127.0.0.1:1/v1", "--speculative", "ngram", "--compare-speculative"],
            "--compare-speculative needs --stages or --join",
        ),
    ];
    for (args, expected) in cases {
        let out = bench(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(expected), "{args:?}: expected {expected:?} in:\n{stderr}");
        assert!(
            out.stdout.is_empty(),
            "{args:?} printed on stdout: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // An API that is not there: a clear error before any run.
    let out = bench(&["--url", "http://127.0.0.1:1/v1", "--concurrency", "1"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("cannot reach the API at http://127.0.0.1:1/v1/models"), "{stderr}");
}

/// A one-thread HTTP server that answers like an OpenAI API whose model always ends at once
/// (one token, then the end of sequence) unless the request carries `ignore_eos: true`, and
/// records the bodies of the completions requests.
fn eos_server() -> (String, std::sync::Arc<std::sync::Mutex<Vec<Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/v1", listener.local_addr().expect("addr"));
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let (content_type, reply) = if request_line.starts_with("GET /v1/models") {
                (
                    "application/json",
                    r#"{"object":"list","data":[{"id":"fake","object":"model"}]}"#.to_owned(),
                )
            } else {
                let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let n = if v["ignore_eos"] == true { v["max_tokens"].as_u64().unwrap_or(1) } else { 1 };
                seen.lock().expect("lock").push(v);
                let mut sse = String::new();
                for _ in 0..n {
                    sse.push_str(
                        "data: {\"choices\":[{\"text\":\"x\",\"logprobs\":{\"tokens\":[\"x\"]}}]}\n\n",
                    );
                }
                sse.push_str(&format!(
                    "data: {{\"choices\":[],\"usage\":{{\"completion_tokens\":{n}}}}}\n\n"
                ));
                sse.push_str("data: [DONE]\n\n");
                ("text/event-stream", sse)
            };
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (url, bodies)
}

#[test]
fn bench_ignore_eos_asks_the_api_for_every_token() {
    let (url, bodies) = eos_server();
    let workload = ["--prompt-tokens", "8", "--gen-tokens", "6", "--concurrency", "1", "--warmup", "0"];
    let without = bench(&[&["--url", url.as_str()][..], &workload].concat());
    let stderr = String::from_utf8_lossy(&without.stderr);
    assert!(without.status.success(), "{stderr}");
    assert!(stderr.contains("1 streams stopped before 6 tokens (end of sequence)"), "{stderr}");
    let with = bench(&[&["--url", url.as_str(), "--ignore-eos"][..], &workload].concat());
    let stderr = String::from_utf8_lossy(&with.stderr);
    assert!(with.status.success(), "{stderr}");
    assert!(!stderr.contains("stopped before"), "every stream got its 6 tokens: {stderr}");
    let bodies = bodies.lock().expect("lock");
    assert_eq!(bodies.len(), 2, "{bodies:?}");
    assert!(bodies[0].get("ignore_eos").is_none(), "{}", bodies[0]);
    assert_eq!(
        (&bodies[1]["ignore_eos"], &bodies[1]["max_tokens"]),
        (&json!(true), &json!(6)),
        "{}",
        bodies[1]
    );
}
