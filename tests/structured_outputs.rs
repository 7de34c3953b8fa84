//! Structured outputs through a real `shoal run --stages 3 --listen`, driven by the official
//! `openai` Python package and checked by an independent validator (`jsonschema`, PyPI):
//! JSON schemas (objects, arrays with enums and bounds, nested objects, numbers, booleans),
//! greedy, seeded at temperature 1, streamed and with `n` choices; `json_object`; the SDK's
//! `parse` helper with a pydantic model; vLLM's `guided_regex`, `guided_choice` and
//! `guided_grammar` on completions; 400s that name what a schema or grammar cannot use.
//! The checks are in `tests/clients/structured_outputs.py`.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::Command;

use api_server::ApiServer;

#[test]
fn outputs_follow_their_schemas_through_a_three_stage_swarm() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    let probe = Command::new("python3")
        .args(["-c", "import openai, jsonschema, pydantic"])
        .status()
        .expect("python3 runs");
    assert!(
        probe.success(),
        "the `openai` or `jsonschema` Python package is missing: pip install openai==3.54.0 jsonschema (.ci/run does)"
    );

    let server = ApiServer::start(&model, &["--stages", "3"], &[]);
    let out = Command::new("python3")
        .arg(root.join("tests/clients/structured_outputs.py"))
        .args([server.url.as_str(), "SmolLM2-135M-Instruct.Q4_1"])
        .output()
        .expect("run the client");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "structured outputs client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}
