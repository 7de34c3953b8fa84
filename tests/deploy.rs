//! deploy/ as far as this machine can check it (no container runtime, no cluster, no systemd
//! as PID 1): every file passes its own tool's check, the files agree with the drain timeout,
//! and the containers' commands (entrypoint, health check, the compose services' environment)
//! make a working swarm when run as processes on loopback.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-deploy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn deploy_files_pass_their_own_checks() {
    let deploy = root().join("deploy");
    // The compose file against the compose specification's schema.
    run(Command::new("check-jsonschema")
        .args(["--builtin-schema", "vendor.compose-spec"])
        .arg(deploy.join("compose.yaml")));
    // The Kubernetes manifests against the API's schemas, unknown fields refused.
    run(Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.30"])
        .arg(deploy.join("k8s/worker.yaml"))
        .arg(deploy.join("k8s/api.yaml")));
    // The systemd unit, with its ExecStart pointed at this build (verify wants the binary).
    let dir = scratch("systemd");
    let unit = std::fs::read_to_string(deploy.join("systemd/shoal-worker.service")).expect("unit");
    let unit = unit
        .replace("ExecStart=/usr/local/bin/shoal ", &format!("ExecStart={} ", env!("CARGO_BIN_EXE_shoal")));
    assert!(unit.contains(env!("CARGO_BIN_EXE_shoal")), "ExecStart moved");
    std::fs::write(dir.join("shoal-worker.service"), unit).expect("write");
    let out = run(Command::new("systemd-analyze").arg("verify").arg(dir.join("shoal-worker.service")));
    assert!(out.stderr.is_empty(), "systemd-analyze verify: {}", String::from_utf8_lossy(&out.stderr));
    // The example config file is one shoal accepts.
    let out = run(Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["config", "print", "worker"])
        .env("SHOAL_CONFIG", deploy.join("systemd/config.toml")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("api = \"0.0.0.0:8000\"  # file"), "{text}");
    // What no schema knows: timeouts against the drain, probes on /health, volumes, user.
    run(Command::new("python3").arg(deploy.join("check.py")));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The environment a compose service's container starts with, remapped to one machine:
/// addresses on loopback with free ports, volumes in `dir`, the model of this checkout.
fn service_env(service: &str, dir: &Path, api_port: u16) -> Vec<(String, String)> {
    let out = run(Command::new("python3").arg(root().join("deploy/check.py")).args(["env", service]));
    let env: serde_json::Map<String, Value> = serde_json::from_slice(&out.stdout).expect("JSON env");
    let model = root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    env.into_iter()
        .map(|(k, v)| {
            let v = v.as_str().expect("string").to_owned();
            let v = match k.as_str() {
                "SHOAL_MODEL" => model.to_string_lossy().into_owned(),
                // Every interface, as in the container, but a free port: the containers'
                // 4433 would clash on one machine.
                "SHOAL_BIND" => "0.0.0.0:0".to_owned(),
                "SHOAL_API" | "SHOAL_LISTEN" => format!("127.0.0.1:{api_port}"),
                "BOOTSTRAP_DIR" => dir.join("bootstrap").to_string_lossy().into_owned(),
                _ => v.replace("/var/lib/shoal", &dir.join(service).to_string_lossy()),
            };
            (k, v)
        })
        .collect()
}

/// A port free now and never handed out before in this test: a service binds its port only
/// once its model is loaded, so a port picked for it earlier must not be picked again for
/// another service meanwhile (a CI run once gave two services the same one).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

struct Container {
    name: String,
    child: Child,
    env: Vec<(String, String)>,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `deploy/docker/entrypoint.sh ARGS` as the image would, with `shoal` on the PATH.
fn start(service: &str, args: &[&str], dir: &Path) -> Container {
    let port = free_port();
    let env = service_env(service, dir, port);
    std::fs::create_dir_all(dir.join(service)).expect("data dir");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_shoal"));
    let path =
        format!("{}:{}", bin.parent().expect("bin dir").display(), std::env::var("PATH").unwrap_or_default());
    let log = std::fs::File::create(dir.join(format!("{service}.log"))).expect("log");
    let child = Command::new("sh")
        .arg(root().join("deploy/docker/entrypoint.sh"))
        .args(args)
        .env_clear()
        .env("PATH", path)
        .env("HOSTNAME", service)
        .env("HOME", dir)
        .env("SHOAL_THREADS", "1")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .expect("start the entrypoint");
    Container { name: service.to_owned(), child, env }
}

/// The image's HEALTHCHECK command with the container's environment.
fn healthy(c: &Container) -> bool {
    Command::new("bash")
        .arg(root().join("deploy/docker/healthcheck.sh"))
        .env_clear()
        .envs(c.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stderr(Stdio::null())
        .status()
        .expect("run the health check")
        .success()
}

fn api_host(c: &Container) -> String {
    c.env
        .iter()
        .find(|(k, _)| k == "SHOAL_API" || k == "SHOAL_LISTEN")
        .map(|(_, v)| v.clone())
        .expect("api address")
}

fn post(host: &str, path: &str, body: &Value) -> (u16, Value) {
    let mut s = TcpStream::connect(host).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(120))).expect("timeout");
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    let (head, rest) = out.split_once("\r\n\r\n").expect("a response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status");
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

fn logs(dir: &Path) -> String {
    ["worker-1", "worker-2", "worker-3", "api"]
        .iter()
        .map(|s| {
            format!("--- {s}\n{}", std::fs::read_to_string(dir.join(format!("{s}.log"))).unwrap_or_default())
        })
        .collect()
}

#[test]
fn the_compose_services_commands_make_a_swarm() {
    let dir = scratch("compose");
    // As compose starts them: worker-1 first, the others once it exists.
    let mut workers = vec![start("worker-1", &["worker"], &dir)];
    workers.push(start("worker-2", &["worker"], &dir));
    workers.push(start("worker-3", &["worker"], &dir));
    let api = start("api", &["api"], &dir);

    // The health check turns green on the API node and on every worker (each serves the API
    // too) once the swarm covers all 30 layers.
    let until = Instant::now() + Duration::from_secs(120);
    let mut all = false;
    while Instant::now() < until {
        if healthy(&api) && workers.iter().all(healthy) {
            all = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(all, "not healthy within 120 s:\n{}", logs(&dir));
    for w in &workers {
        let ticket =
            std::fs::read_to_string(dir.join(format!("bootstrap/{}.ticket", w.name))).expect("ticket");
        assert!(ticket.trim().starts_with("endpoint"), "{}: {ticket}", w.name);
        assert!(dir.join(format!("{}/node.key", w.name)).is_file(), "{}: no node key in its volume", w.name);
    }

    let (status, body) = post(
        &api_host(&api),
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{body}\n{}", logs(&dir));
    let text = body["choices"][0]["message"]["content"].as_str().unwrap_or_default();
    assert!(!text.is_empty(), "{body}");

    // `docker stop`: SIGTERM, and the worker drains and exits 0 well within the 45 s grace.
    let mut w3 = workers.pop().expect("worker-3");
    run(Command::new("kill").args(["-TERM", &w3.child.id().to_string()]));
    let until = Instant::now() + Duration::from_secs(40);
    let status = loop {
        if let Some(s) = w3.child.try_wait().expect("wait") {
            break Some(s);
        }
        if Instant::now() > until {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.is_some_and(|s| s.success()), "worker-3 after SIGTERM: {status:?}\n{}", logs(&dir));
    drop(api);
    drop(workers);
    let _ = std::fs::remove_dir_all(&dir);
}
