//! The official `openai` Python package (PyPI, installed by `.ci/run`) against a real
//! `shoal run --stages 3 --listen`: chat and completions, streamed and not, include_usage,
//! stop sequences, seeded reproducibility, max_completion_tokens, logprobs, `n` choices, an
//! API key (the key from `SHOAL_API_KEY`; a wrong one is the SDK's AuthenticationError) and
//! errors parsed as the SDK's exceptions. The checks are in `tests/clients/openai_sdk.py`.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::Command;

use api_server::ApiServer;

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

    let server = ApiServer::start(&model, &["--stages", "3"], &[("SHOAL_API_KEY", "test-key")]);
    let out = Command::new("python3")
        .arg(root.join("tests/clients/openai_sdk.py"))
        .args([server.url.as_str(), "SmolLM2-135M-Instruct.Q4_1", "test-key"])
        .output()
        .expect("run the client");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "openai client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
