//! The official `openai` Python package (PyPI, installed by `.ci/run`) against a real
//! `shoal run --stages 3 --listen`: chat and completions, streamed and not, include_usage,
//! stop sequences, seeded reproducibility, max_completion_tokens, logprobs, `n` choices, an
//! API key (the key from `SHOAL_API_KEY`; a wrong one is the SDK's AuthenticationError) and
//! errors parsed as the SDK's exceptions. The checks are in `tests/clients/openai_sdk.py`.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[test]
fn the_openai_python_sdk_works_unmodified() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    let probe = Command::new("python3").args(["-c", "import openai"]).status().expect("python3 runs");
    assert!(
        probe.success(),
        "the `openai` Python package is missing: pip install openai==3.54.0 (.ci/run does)"
    );

    let mut server = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .args(["run", "--stages", "3", "--listen", "127.0.0.1:0", "--model"])
        .arg(&model)
        .env("SHOAL_THREADS", "2")
        .env("SHOAL_API_KEY", "test-key")
        .stdout(Stdio::piped())
        .spawn()
        .expect("start shoal run");
    let stdout = server.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            l.strip_prefix("listening: ").map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
        })
        .expect("shoal prints the address it listens on");
    std::thread::spawn(move || for _ in lines {});
    let out = Command::new("python3")
        .arg(root.join("tests/clients/openai_sdk.py"))
        .args([url.as_str(), "SmolLM2-135M-Instruct.Q4_1", "test-key"])
        .output()
        .expect("run the client");
    let _ = server.kill();
    let _ = server.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
