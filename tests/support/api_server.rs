//! A `shoal run --listen 127.0.0.1:0` process for tests that drive the API from outside.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running API server, killed when dropped.
pub struct ApiServer {
    child: Child,
    /// Its base URL, `http://127.0.0.1:PORT/v1`.
    pub url: String,
}

impl ApiServer {
    /// Starts `shoal run --listen 127.0.0.1:0 --model MODEL ARGS` with `envs` and waits for
    /// the address it prints.
    pub fn start(model: &Path, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_shoal"))
            .args(["run", "--listen", "127.0.0.1:0", "--model"])
            .arg(model)
            .args(args)
            .env("SHOAL_THREADS", "2")
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start shoal run");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|l| {
                l.strip_prefix("listening: ").and_then(|r| r.split_whitespace().next()).map(str::to_owned)
            })
            .expect("shoal prints the address it listens on");
        std::thread::spawn(move || for _ in lines {});
        Self { child, url }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
