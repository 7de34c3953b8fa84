//! Weights from the swarm, as a volunteer meets them: real `shoal` processes on loopback.
//!
//! A worker with the model file serves layers 0..15; a second worker started with a ticket
//! alone (no `--model`, an empty data dir) fetches only the pieces of layers 15..30 from it and
//! serves them; an origin with no model file (`shoal generate --join`) fetches only the
//! header, from the second worker. Greedy ids through the pair equal the one-process run, and
//! those of an origin that has the file.
//!
//! The cache budget: a worker that served 0..15 restarts on 15..30 with a budget that cannot
//! hold both; it evicts the old layers (never the pieces it needs), serves, and its data dir
//! stays within the budget; a budget below what the span needs is a clear error.
//!
//! A mirror (`--weights-url`): when the only holder of layers 15..30 has left, a joiner reads
//! them from an HTTP server of the file with byte ranges (as the Hugging Face Hub serves a
//! GGUF): only those pieces' bytes, verified; the pieces a peer still holds come from the peer.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;
use shoal_model_shards::manifest::Manifest;

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-weights-proc-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A `shoal worker` process (killed when dropped), with what it printed until `ready:`.
struct Worker {
    child: Child,
    ticket: String,
    stderr: std::thread::JoinHandle<String>,
}

impl Worker {
    fn start(args: &[&str], data_dir: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .arg("worker")
            .args(args)
            .args(["--bind", "127.0.0.1:0", "--announce-interval", "1", "--data-dir"])
            .arg(data_dir)
            .env("SHOAL_THREADS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start a worker");
        let mut err = child.stderr.take().expect("stderr");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let mut ticket = None;
        let mut ready = false;
        for line in lines.by_ref() {
            let line = line.expect("worker stdout");
            if let Some(t) = line.strip_prefix("ticket: ") {
                ticket = Some(t.to_owned());
            }
            if line.starts_with("ready: ") {
                ready = true;
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let mut w = Self { child, ticket: ticket.unwrap_or_default(), stderr };
        if !ready {
            let _ = w.child.kill();
            let log = w.log();
            panic!("worker {args:?} did not become ready: {log}");
        }
        w
    }

    /// Stops the worker and returns its stderr.
    fn log(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.stderr, std::thread::spawn(String::new)).join().unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Deserialize, Debug)]
struct JsonLine {
    text: String,
    token_ids: Vec<u32>,
}

fn generate(args: &[&str]) -> (JsonLine, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .arg("generate")
        .args(["--prompt", "The three primary colors are", "--max-tokens", "32", "--json"])
        .args(args)
        .env("SHOAL_THREADS", "2")
        .output()
        .expect("run shoal generate");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "shoal generate {args:?} failed: {stderr}");
    (serde_json::from_slice(&out.stdout).expect("one JSON line"), stderr)
}

#[test]
fn a_worker_joins_with_a_ticket_alone_and_fetches_only_its_span() {
    let m = model();
    let manifest = Manifest::of_gguf(&m).expect("manifest");
    let (d0, d1, d2) = (temp_dir("seeder"), temp_dir("joiner"), temp_dir("origin"));
    let mut seeder = Worker::start(&["--model", m.to_str().expect("utf-8"), "--layers", "0..15"], &d0);
    let mut joiner = Worker::start(&["--join", &seeder.ticket, "--layers", "15..30"], &d1);

    let (local, _) = generate(&["--model", m.to_str().expect("utf-8")]);
    assert!(local.token_ids.len() >= 8, "{local:?}");
    let bind = ["--bind", "127.0.0.1:0", "--announce-interval", "1"];
    // Through the joiner's ticket: the origin's header comes from the joiner, which serves the
    // pieces it fetched.
    let mut no_file = vec!["--join", joiner.ticket.as_str(), "--data-dir", d2.to_str().expect("utf-8")];
    no_file.extend(bind);
    let (swarm, origin_log) = generate(&no_file);
    assert_eq!(swarm.token_ids, local.token_ids, "{origin_log}");
    assert_eq!(swarm.text, local.text);
    let mut with_file = vec!["--join", seeder.ticket.as_str(), "--model", m.to_str().expect("utf-8")];
    with_file.extend(bind);
    let (with_file, _) = generate(&with_file);
    assert_eq!(with_file.token_ids, local.token_ids);

    // The joiner fetched exactly its span's pieces (and the header), far less than the file.
    let log = joiner.log();
    let want = manifest.bytes_of(&manifest.pieces_for_span(15..30));
    let line = log.lines().find(|l| l.starts_with("fetched: ")).unwrap_or_else(|| panic!("{log}"));
    eprintln!("joiner: {line}");
    let header = manifest.bytes_of(&manifest.pieces_for_span(0..0));
    let fetched: u64 =
        line["fetched: ".len()..].split(' ').next().and_then(|n| n.parse().ok()).expect("a byte count");
    assert_eq!(fetched + header, want, "{line}");
    assert!(want < manifest.file_size * 7 / 10, "{want} of {}", manifest.file_size);
    // The origin fetched the header alone.
    assert!(origin_log.contains(&format!("header from the swarm: {header} bytes")), "{origin_log}");
    let on_disk = |dir: &Path| -> u64 {
        let file = dir.join("models").join(hex(&manifest.id())).join("model.gguf");
        std::fs::metadata(&file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).expect("the copy")
    };
    // Sparse copies: disk use follows what was fetched, not the file's size.
    assert!(on_disk(&d1) < want + (1 << 20), "{} on disk", on_disk(&d1));
    assert!(on_disk(&d2) < header + (1 << 20), "{} on disk", on_disk(&d2));
    let seeder_log = seeder.log();
    assert!(!seeder_log.contains("does not match"), "{seeder_log}");
    for d in [d0, d1, d2] {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_joiner_whose_ticket_is_not_a_worker_gets_a_clear_error() {
    let d = temp_dir("noworker");
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["worker", "--layers", "0..2", "--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&d)
        .args(["--join", "not-a-ticket"])
        .output()
        .expect("run shoal worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--join not-a-ticket") || err.contains("invalid ticket"), "{err}");
    let _ = std::fs::remove_dir_all(d);
}

#[test]
fn the_cache_budget_evicts_old_layers_and_refuses_a_span_it_cannot_hold() {
    let m = model();
    let manifest = Manifest::of_gguf(&m).expect("manifest");
    let (d0, d1) = (temp_dir("budget-seeder"), temp_dir("budget-joiner"));
    let seeder = Worker::start(&["--model", m.to_str().expect("utf-8"), "--layers", "0..30"], &d0);
    let mut first = Worker::start(&["--join", &seeder.ticket, "--layers", "0..15"], &d1);
    let first_log = first.log();
    assert!(!first_log.contains("cache budget"), "{first_log}");
    let on_disk = || -> u64 {
        let file = d1.join("models").join(hex(&manifest.id())).join("model.gguf");
        std::fs::metadata(&file).map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512).expect("the copy")
    };
    let second_half = manifest.bytes_of(&manifest.pieces_for_span(15..30));
    let both = manifest.bytes_of(&manifest.pieces_for_span(0..30));
    assert!(on_disk() + second_half > both, "the first run kept layers 0..15");
    let budget = second_half + (1 << 20);
    let budget_arg = budget.to_string();
    let mut second =
        Worker::start(&["--join", &seeder.ticket, "--layers", "15..30", "--cache-budget", &budget_arg], &d1);
    let log = second.log();
    assert!(log.contains("cache budget: evicted"), "{log}");
    assert!(on_disk() <= budget + (1 << 20), "{} bytes on disk, budget {budget}", on_disk());

    // A budget that cannot hold the span: refused with the flag named.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["worker", "--layers", "0..15", "--bind", "127.0.0.1:0", "--cache-budget", "4MiB"])
        .args(["--join", &seeder.ticket, "--data-dir"])
        .arg(&d1)
        .output()
        .expect("run shoal worker");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cache budget of 4.0 MiB") && err.contains("raise --cache-budget"), "{err}");
    drop(seeder);
    for d in [d0, d1] {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A minimal HTTP/1.1 server of one file that answers range requests with 206 (keep-alive),
/// counting the body bytes it sends.
fn range_server(bytes: Arc<Vec<u8>>) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the HTTP server");
    let addr = listener.local_addr().expect("address");
    let sent = Arc::new(AtomicU64::new(0));
    let counter = sent.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (bytes, sent) = (bytes.clone(), counter.clone());
            std::thread::spawn(move || serve_ranges(stream, &bytes, &sent));
        }
    });
    (addr, sent)
}

fn serve_ranges(stream: TcpStream, bytes: &[u8], sent: &AtomicU64) {
    let mut out = stream.try_clone().expect("clone the stream");
    let mut reader = BufReader::new(stream);
    loop {
        let mut range = None;
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("range: bytes=") {
                let (a, b) = v.split_once('-').expect("a-b");
                range = Some((a.parse::<usize>().expect("start"), b.parse::<usize>().expect("end")));
            }
        }
        let reply = match range {
            Some((a, b)) if a <= b && b < bytes.len() => {
                sent.fetch_add((b + 1 - a) as u64, Ordering::Relaxed);
                let head = format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {a}-{b}/{}\r\n\r\n",
                    b + 1 - a,
                    bytes.len()
                );
                out.write_all(head.as_bytes()).and_then(|()| out.write_all(&bytes[a..=b]))
            }
            _ => out.write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n"),
        };
        if reply.is_err() {
            return;
        }
    }
}

#[test]
fn a_joiner_reads_the_pieces_no_peer_holds_from_an_http_mirror_by_byte_ranges() {
    let m = model();
    let manifest = Manifest::of_gguf(&m).expect("manifest");
    let (addr, sent) = range_server(Arc::new(std::fs::read(&m).expect("read the model")));
    let url = format!("http://{addr}/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (d0, d1, d2, d3) =
        (temp_dir("m-seeder"), temp_dir("m-first"), temp_dir("m-second"), temp_dir("m-origin"));
    // The file's only holder seeds a first joiner (layers 0..15's pieces), then leaves.
    let mut seeder = Worker::start(&["--model", m.to_str().expect("utf-8"), "--layers", "0..15"], &d0);
    let first = Worker::start(&["--join", &seeder.ticket, "--layers", "0..15"], &d1);
    seeder.log();
    let mut second =
        Worker::start(&["--join", &first.ticket, "--layers", "15..30", "--weights-url", &url], &d2);

    // The mirror sent exactly the pieces of 15..30 that the first joiner does not hold.
    let held_by_first: Vec<usize> = manifest.pieces_for_span(0..15);
    let from_mirror: Vec<usize> =
        manifest.pieces_for_span(15..30).into_iter().filter(|i| !held_by_first.contains(i)).collect();
    let want = manifest.bytes_of(&from_mirror);
    assert_eq!(sent.load(Ordering::Relaxed), want);
    assert!(want < manifest.file_size / 2, "{want} of {}", manifest.file_size);

    let (local, _) = generate(&["--model", m.to_str().expect("utf-8")]);
    let mut args = vec!["--join", first.ticket.as_str(), "--data-dir", d3.to_str().expect("utf-8")];
    args.extend(["--bind", "127.0.0.1:0", "--announce-interval", "1"]);
    let (swarm, origin_log) = generate(&args);
    assert_eq!(swarm.token_ids, local.token_ids, "{origin_log}");
    let log = second.log();
    let line = log.lines().find(|l| l.starts_with("fetched: ")).unwrap_or_else(|| panic!("{log}"));
    eprintln!("second joiner: {line}");
    assert!(line.contains(&format!("{} pieces from {url}", from_mirror.len())), "{line}");
    drop(first);
    for d in [d0, d1, d2, d3] {
        let _ = std::fs::remove_dir_all(d);
    }
}
