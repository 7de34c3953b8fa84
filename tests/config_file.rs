//! The config file as a user meets it: the real binary, a TOML file, environment variables and
//! flags. Precedence is flag > env > file > default, `shoal config print` says where each
//! setting comes from, and a bad file is refused with the key named.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;

fn model() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-config-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// `shoal ARGS` with no SHOAL_* variables but `envs`, and the default config locations pointed
/// at `home` (so a developer's own file cannot leak in).
fn shoal(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal"));
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args)
        .env("XDG_CONFIG_HOME", home.join("xdg"))
        .env("HOME", home)
        .env("SHOAL_THREADS", "2")
        .envs(envs.iter().copied())
        .output()
        .expect("run shoal")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "shoal failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr_of_failure(o: &Output) -> String {
    assert!(!o.status.success(), "shoal should have failed: {}", String::from_utf8_lossy(&o.stdout));
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The line of `key` in `config print` output.
fn line<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(&format!("{key} = ")) || l.starts_with(&format!("# {key} = ")))
        .unwrap_or_else(|| panic!("no line for {key} in:\n{text}"))
}

#[test]
fn config_print_shows_each_setting_with_its_source_in_precedence_order() {
    let dir = scratch("precedence");
    let file = dir.join("shoal.toml");
    std::fs::write(
        &file,
        "kv-budget-mib = 512\nmax-sessions = 7\nidle-timeout = 99\njoin = [\"t1\", \"t2\"]\n\n[worker]\nmax-sessions = 9\ndrain-timeout = 45\n",
    )
    .expect("write");
    let f = file.to_str().expect("utf-8 path");
    let out = stdout(&shoal(
        &dir,
        &["--config", f, "config", "print", "worker", "--kv-budget-mib", "1024"],
        &[("SHOAL_IDLE_TIMEOUT", "11")],
    ));
    assert!(out.contains(&format!("config file {f}")), "{out}");
    assert!(out.contains("\n[worker]\n"), "{out}");
    // flag > env > file > default, and a [worker] table over the top level.
    assert_eq!(line(&out, "kv-budget-mib"), "kv-budget-mib = 1024  # flag");
    assert_eq!(line(&out, "idle-timeout"), "idle-timeout = 11  # env SHOAL_IDLE_TIMEOUT");
    assert_eq!(line(&out, "max-sessions"), "max-sessions = 9  # file, via SHOAL_MAX_SESSIONS");
    assert_eq!(line(&out, "drain-timeout"), "drain-timeout = 45  # file, via SHOAL_DRAIN_TIMEOUT");
    assert_eq!(line(&out, "join"), "join = [\"t1\", \"t2\"]  # file, via SHOAL_JOIN");
    assert_eq!(line(&out, "max-seq-len"), "max-seq-len = 8192  # default");
    assert_eq!(line(&out, "key-file"), "# key-file = (unset; env SHOAL_KEY_FILE)");

    // SHOAL_CONFIG names the file too; [worker] does not reach `shoal run`.
    let out = stdout(&shoal(&dir, &["config", "print", "run"], &[("SHOAL_CONFIG", f)]));
    assert_eq!(line(&out, "max-sessions"), "max-sessions = 7  # file, via SHOAL_MAX_SESSIONS");
    assert!(!out.contains("drain-timeout"), "run has no drain timeout:\n{out}");

    // Every command at once, and the output is itself a config file that gives the same.
    let all = stdout(&shoal(&dir, &["--config", f, "config", "print"], &[]));
    for table in ["[run]", "[worker]", "[api]", "[generate]", "[status]", "[bench]"] {
        assert!(all.contains(table), "{table} missing:\n{all}");
    }
    let printed = dir.join("printed.toml");
    let worker = stdout(&shoal(&dir, &["--config", f, "config", "print", "worker"], &[]));
    std::fs::write(&printed, &worker).expect("write");
    let again = stdout(&shoal(
        &dir,
        &["--config", printed.to_str().expect("utf-8"), "config", "print", "worker"],
        &[],
    ));
    for key in ["kv-budget-mib", "max-sessions", "drain-timeout", "join", "model", "layers"] {
        let value = |t: &str| line(t, key).split("  #").next().unwrap_or_default().to_owned();
        assert_eq!(value(&again), value(&worker), "{key}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[derive(Deserialize)]
struct JsonLine {
    completion_tokens: usize,
}

#[test]
fn a_command_runs_with_the_file_under_env_under_flags() {
    let dir = scratch("generate");
    let model = model();
    let file = dir.join("xdg/shoal/config.toml");
    std::fs::create_dir_all(file.parent().expect("parent")).expect("mkdir");
    // The default location, with the model's path and generate's own table.
    std::fs::write(
        &file,
        format!("model = {:?}\njson = true\n\n[generate]\nmax-tokens = 3\n", model.to_str().expect("utf-8")),
    )
    .expect("write");
    let tokens = |o: Output| -> usize {
        let text = stdout(&o);
        serde_json::from_str::<JsonLine>(text.trim()).expect("one JSON line").completion_tokens
    };
    let prompt = ["generate", "--prompt", "The capital of France is"];
    assert_eq!(tokens(shoal(&dir, &prompt, &[])), 3, "the file");
    assert_eq!(tokens(shoal(&dir, &prompt, &[("SHOAL_MAX_TOKENS", "4")])), 4, "env over the file");
    let mut with_flag = prompt.to_vec();
    with_flag.extend(["--max-tokens", "5"]);
    assert_eq!(tokens(shoal(&dir, &with_flag, &[("SHOAL_MAX_TOKENS", "4")])), 5, "the flag over env");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_files_are_refused_with_the_key_named() {
    let dir = scratch("errors");
    let cases = [
        ("kv-budget = 1\n", "unknown key `kv-budget`"),
        ("kv_budget_mib = 1\n", "flags are written with dashes: `kv-budget-mib`"),
        ("[worker]\nlisten = \"127.0.0.1:1\"\n", "unknown key `listen` in [worker]"),
        ("[workers]\n", "unknown table [workers]"),
        ("max-sessions = \"many\"\n", "`max-sessions = \"many\"`"),
        ("relay = 1\n", "`relay = 1`: a switch: true or false"),
        ("model = [\"a\", \"b\"]\n", "`model` takes one value, not a list"),
        ("= broken\n", "not valid TOML"),
    ];
    for (text, expected) in cases {
        let file = dir.join("bad.toml");
        std::fs::write(&file, text).expect("write");
        let f = file.to_str().expect("utf-8");
        let err = stderr_of_failure(&shoal(&dir, &["--config", f, "status", "--join", "x"], &[]));
        assert!(err.contains(expected) && err.contains(f), "{text:?}: expected {expected:?} in {err}");
    }
    let missing = dir.join("missing.toml");
    let err = stderr_of_failure(&shoal(
        &dir,
        &["config", "print"],
        &[("SHOAL_CONFIG", missing.to_str().expect("utf-8"))],
    ));
    assert!(err.contains("reading the config file") && err.contains("missing.toml"), "{err}");
    let err = stderr_of_failure(&shoal(&dir, &["config", "print", "wrker"], &[]));
    assert!(err.contains("no command `wrker`"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
