//! schemathesis (PyPI, installed by `.ci/run`) against `/openapi.json` of a real
//! `shoal run --stages 2 --listen`: generated valid and invalid requests to every operation;
//! no response may be a 5xx, each must match the document's statuses, content types, headers
//! and schemas (streamed events included), and every request the document calls invalid
//! must be refused. The context is capped (`--max-model-len 64`) so generated requests stay short.

#[path = "support/api_server.rs"]
mod api_server;

use std::path::PathBuf;
use std::process::Command;

use api_server::ApiServer;

#[test]
fn schemathesis_finds_no_server_error_and_no_schema_violation() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(model.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", model.display());
    let probe = Command::new("schemathesis").arg("--version").output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "schemathesis is missing: pip install schemathesis==4.32.5 (.ci/run does)"
    );
    let server = ApiServer::start(&model, &["--stages", "2", "--max-model-len", "64", "--max-n", "2"], &[]);
    let base = server.url.trim_end_matches("/v1").to_owned();
    let report = std::env::temp_dir().join(format!("shoal-schemathesis-{}", std::process::id()));
    std::fs::create_dir_all(&report).expect("scratch directory");
    let out = Command::new("schemathesis")
        // schemathesis keeps a cache in its working directory: not in the source tree.
        .current_dir(&report)
        .arg("run")
        .arg(format!("{base}/openapi.json"))
        .args(["--url", &base])
        .args([
            // Every check but positive_data_acceptance: a schema-valid prompt can still be
            // longer than the model's context, which no schema can say, and that is a 400.
            "--checks",
            "all",
            "--exclude-checks",
            "positive_data_acceptance",
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--seed",
            "1",
            "--generation-database",
            "none",
            "--request-timeout",
            "120",
            // No limit on response time short of the request timeout: a generation's time
            // follows the machine's load, and timing is for benchmarks, not tests
            // (schemathesis's own limit of 10 s failed a run on a loaded machine).
            "--max-response-time",
            "120",
            "--no-color",
            "--suppress-health-check",
            "all",
            "--report-dir",
        ])
        .arg(&report)
        .output()
        .expect("run schemathesis");
    drop(server);
    let _ = std::fs::remove_dir_all(&report);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(out.status.success(), "schemathesis found problems:\n{stdout}\n{stderr}");
}
