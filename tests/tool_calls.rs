//! Tool calling through a real `shoal run --stages 3 --listen`, driven by the official
//! `openai` Python package: `required` and named functions (forced by a grammar, so the
//! arguments always satisfy the parameters' schema, checked by `jsonschema`), parallel
//! calls, streamed `tool_calls` deltas that reassemble into the same calls, a full round trip
//! (call, `tool` result, answer), `auto`, `none`, and 400s for bad tool requests.
//! SmolLM2's template has no tools section, so that runs the fallback prompt; a second test
//! serves a random-weight Qwen3 (the tiny fixture's layers, SmolLM2's vocabulary) with Qwen's
//! chat template, which renders the tools, the calls and the results itself, and checks what
//! the grammar guarantees whatever the weights. The checks are in `tests/clients/tool_calls.py`.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::{Path, PathBuf};
use std::process::Command;

use api_server::ApiServer;
use candle_core::{Device, Tensor};
use serde_json::Value;

/// Runs the tool-calls client against `shoal run --stages 2 --model MODEL` with `args`.
fn run_client(model: &Path, served: &str, client_args: &[&str]) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let probe =
        Command::new("python3").args(["-c", "import openai, jsonschema"]).status().expect("python3 runs");
    assert!(
        probe.success(),
        "the `openai` or `jsonschema` Python package is missing (.ci/run installs them)"
    );
    let server = ApiServer::start(model, &["--stages", "3", "--served-model-name", served], &[]);
    let out = Command::new("python3")
        .arg(root.join("tests/clients/tool_calls.py"))
        .args([server.url.as_str(), served])
        .args(client_args)
        .output()
        .expect("run the client");
    drop(server);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tool calls client failed:\n{stdout}\n{stderr}");
    eprintln!("{stdout}");
    assert!(stdout.starts_with("ok: "), "{stdout}");
}

#[test]
fn forced_calls_parse_and_fit_their_schemas_through_a_three_stage_swarm() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    run_client(&model, "SmolLM2-135M-Instruct.Q4_1", &[]);
}

/// A Hugging Face directory of a random-weight Qwen3 whose chat template has a tools section:
/// the tiny fixture's layers, SmolLM2's tokenizer (49,152 ids) with random embeddings and
/// output head of that size, and Qwen2.5's chat template (its tools section is Qwen3's).
fn random_qwen3_with_a_tools_template(dir: &Path) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fixture = root.join("tests/fixtures/tiny/qwen3");
    let tokenizer = root.join("tests/fixtures/hf_tokenizer/smollm2");
    std::fs::create_dir_all(dir).expect("model dir");
    let vocab = 49_152usize;
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(fixture.join("config.json")).expect("config")).expect("JSON");
    config["vocab_size"] = vocab.into();
    config["max_position_embeddings"] = 2048.into();
    config["bos_token_id"] = 1.into();
    config["eos_token_id"] = 2.into();
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    let mut tensors = candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
        .expect("fixture weights");
    let hidden = config["hidden_size"].as_u64().expect("hidden_size") as usize;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let t = Tensor::randn(0f32, 0.5, (vocab, hidden), &Device::Cpu).expect("random weights");
        tensors.insert(name.to_owned(), t);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).expect("write weights");
    std::fs::copy(tokenizer.join("tokenizer.json"), dir.join("tokenizer.json")).expect("tokenizer");
    let mut tc: Value = serde_json::from_slice(
        &std::fs::read(tokenizer.join("tokenizer_config.json")).expect("tokenizer config"),
    )
    .expect("JSON");
    let template =
        std::fs::read_to_string(root.join("tests/fixtures/templates/qwen2.5_tools.jinja")).expect("template");
    tc["chat_template"] = template.into();
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).expect("write tokenizer config");
}

#[test]
fn a_template_with_a_tools_section_renders_them_and_forced_calls_stay_valid() {
    let dir = std::env::temp_dir().join(format!("shoal-qwen3-tools-{}", std::process::id()));
    random_qwen3_with_a_tools_template(&dir);
    run_client(&dir, "qwen3-random", &["--random-weights"]);
    let _ = std::fs::remove_dir_all(&dir);
}
