//! Tool calling through a real `shoal run --stages 3 --listen`, driven by the official
//! `openai` Python package: `required` and named functions (forced by a grammar, so the
//! arguments always satisfy the parameters' schema, checked by `jsonschema`), parallel
//! calls, streamed `tool_calls` deltas that reassemble into the same calls, a full round trip
//! (call, `tool` result, answer), `auto`, `none`, and 400s for bad tool requests.
//! SmolLM2's template has no tools section, so this runs the fallback prompt. The checks are
//! in `tests/clients/tool_calls.py`.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::Command;

use api_server::ApiServer;

#[test]
fn forced_calls_parse_and_fit_their_schemas_through_a_three_stage_swarm() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    let probe =
        Command::new("python3").args(["-c", "import openai, jsonschema"]).status().expect("python3 runs");
    assert!(
        probe.success(),
        "the `openai` or `jsonschema` Python package is missing (.ci/run installs them)"
    );

    let server = ApiServer::start(&model, &["--stages", "3"], &[]);
    let out = Command::new("python3")
        .arg(root.join("tests/clients/tool_calls.py"))
        .args([server.url.as_str(), "SmolLM2-135M-Instruct.Q4_1"])
        .output()
        .expect("run the client");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tool calls client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
