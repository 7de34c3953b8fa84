//! The official `anthropic` Python package (PyPI, installed by `.ci/run`) against the
//! Messages API of a real `shoal run --stages 3 --listen` with an API key: create (system as
//! a string and as blocks, content blocks), streaming (`text_stream`, the final message, the
//! events' order), stop_sequences, max_tokens, count_tokens, an assistant prefill, and
//! errors parsed as the SDK's exceptions (wrong key, missing max_tokens, a bad value, an
//! unknown model). The checks are in `tests/clients/anthropic_sdk.py`.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::Command;

use api_server::ApiServer;

#[test]
fn the_anthropic_python_sdk_works_unmodified() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    let probe = Command::new("python3").args(["-c", "import anthropic"]).status().expect("python3 runs");
    assert!(
        probe.success(),
        "the `anthropic` Python package is missing: pip install anthropic==2.17.0 (.ci/run does)"
    );

    let server = ApiServer::start(&model, &["--stages", "3"], &[("SHOAL_API_KEY", "test-key")]);
    let out = Command::new("python3")
        .arg(root.join("tests/clients/anthropic_sdk.py"))
        .args([server.url.as_str(), "SmolLM2-135M-Instruct.Q4_1", "test-key"])
        .output()
        .expect("run the client");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "anthropic client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
