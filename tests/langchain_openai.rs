//! LangChain's `ChatOpenAI` (the langchain-openai package from PyPI, installed by `.ci/run`)
//! against a real `shoal run --stages 2 --listen` with an API key: `invoke` (messages and a
//! plain string, multi-turn), `stream` with usage, `stop`, seeded sampling and `batch`, each
//! compared with what the node answers the official `openai` SDK; `bind_tools` and
//! `with_structured_output`. The checks are in
//! `tests/clients/langchain_client.py`.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::Command;

use api_server::ApiServer;

#[test]
fn langchain_chat_openai_invokes_and_streams() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    let probe = Command::new("python3")
        .args(["-c", "import langchain_openai, openai"])
        .status()
        .expect("python3 runs");
    assert!(
        probe.success(),
        "the `langchain-openai` Python package is missing: pip install langchain-openai==1.8.1 (.ci/run does)"
    );

    let server = ApiServer::start(&model, &["--stages", "2"], &[("SHOAL_API_KEY", "test-key")]);
    let out = Command::new("python3")
        .arg(root.join("tests/clients/langchain_client.py"))
        .args([server.url.as_str(), "SmolLM2-135M-Instruct.Q4_1", "test-key"])
        .output()
        .expect("run the client");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "langchain client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
