use super::*;

fn parse(text: &str) -> Result<ConfigFile> {
    ConfigFile::parse(Path::new("test.toml"), text, &command())
}

fn err(text: &str) -> String {
    format!("{:#}", parse(text).expect_err("the file should be refused"))
}

fn env_of(file: &ConfigFile, name: &str) -> BTreeMap<String, String> {
    file.env_for(&command(), name).into_iter().collect()
}

#[test]
fn every_flag_has_an_environment_twin() {
    let root = command();
    let mut missing = Vec::new();
    for cmd in std::iter::once(&root).chain(commands(&root)) {
        for arg in cmd.get_arguments().filter(|a| is_setting(a)) {
            if arg.get_env().is_none() {
                missing.push(format!("shoal {} --{}", cmd.get_name(), arg.get_long().unwrap_or_default()));
            }
        }
    }
    assert!(missing.is_empty(), "flags without an env twin: {missing:?}");
    // And `--config` itself.
    let config = root.get_arguments().find(|a| a.get_long() == Some("config")).expect("--config");
    assert_eq!(config.get_env().and_then(|e| e.to_str()), Some(CONFIG_ENV));
}

#[test]
fn a_flag_name_maps_to_the_same_variable_in_every_command_but_bench_targets() {
    // Top-level keys rely on this: one key, one meaning.
    let root = command();
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for cmd in commands(&root) {
        for arg in cmd.get_arguments().filter(|a| is_setting(a)) {
            let env = arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
            seen.entry(arg.get_long().unwrap_or_default().to_owned()).or_default().insert(env);
        }
    }
    let many: Vec<_> = seen.iter().filter(|(_, envs)| envs.len() > 1).map(|(k, _)| k.as_str()).collect();
    assert_eq!(many, ["join", "stages"], "{seen:?}");
}

#[test]
fn top_level_keys_reach_every_command_with_the_flag_and_tables_override_them() {
    let file = parse(
        r#"
model = "/srv/model.gguf"
kv-budget-mib = 512
join = ["ticketA", "ticketB"]
relay = true
threads = 2

[worker]
kv-budget-mib = 1024
layers = "0..10"
drain-timeout = 45.5
"#,
    )
    .expect("valid");
    let worker = env_of(&file, "worker");
    assert_eq!(worker["SHOAL_MODEL"], "/srv/model.gguf");
    assert_eq!(worker["SHOAL_KV_BUDGET_MIB"], "1024");
    assert_eq!(worker["SHOAL_LAYERS"], "0..10");
    assert_eq!(worker["SHOAL_DRAIN_TIMEOUT"], "45.5");
    assert_eq!(worker["SHOAL_JOIN"], "ticketA,ticketB");
    assert_eq!(worker["SHOAL_RELAY"], "true");
    assert_eq!(worker["SHOAL_THREADS"], "2");
    let run = env_of(&file, "run");
    assert_eq!(run["SHOAL_KV_BUDGET_MIB"], "512");
    assert!(!run.contains_key("SHOAL_LAYERS"), "[worker] stays with the worker");
    // `shoal api` has no stage limits: the top-level key does not apply there.
    assert!(!env_of(&file, "api").contains_key("SHOAL_KV_BUDGET_MIB"));
    assert_eq!(env_of(&file, "api")["SHOAL_JOIN"], "ticketA,ticketB");
    // An empty list is the flag not given.
    let empty = parse("join = []\n").expect("valid");
    assert!(!env_of(&empty, "worker").contains_key("SHOAL_JOIN"));
}

#[test]
fn unknown_keys_and_tables_are_named() {
    let e = err("kv-budget = 3\n");
    assert!(e.contains("unknown key `kv-budget`") && e.contains("test.toml"), "{e}");
    let e = err("kv_budget_mib = 3\n");
    assert!(e.contains("`kv-budget-mib`"), "a hint at dashes: {e}");
    let e = err("[worker]\nlisten = \"127.0.0.1:1\"\n");
    assert!(e.contains("unknown key `listen` in [worker]") && e.contains("no --listen flag"), "{e}");
    let e = err("[wrker]\nlayers = \"auto\"\n");
    assert!(e.contains("unknown table [wrker]") && e.contains("worker"), "{e}");
    let e = err("config = \"other.toml\"\n");
    assert!(e.contains("unknown key `config`"), "{e}");
    let e = err("[config]\nthreads = 1\n");
    assert!(e.contains("unknown table [config]"), "{e}");
}

#[test]
fn bad_values_are_named_with_their_key() {
    let e = err("kv-budget-mib = \"lots\"\n");
    assert!(e.contains("`kv-budget-mib = \"lots\"`") && e.contains("invalid value"), "{e}");
    let e = err("relay = \"yes\"\n");
    assert!(e.contains("`relay = \"yes\"`") && e.contains("true or false"), "{e}");
    let e = err("model = [\"a\", \"b\"]\n");
    assert!(e.contains("`model` takes one value"), "{e}");
    let e = err("wire-dtype = \"f64\"\n");
    assert!(e.contains("wire-dtype") && e.contains("f64"), "{e}");
    let e = err("[worker]\nbind = \"nowhere\"\n");
    assert!(e.contains("[worker] bind"), "{e}");
    let e = err("join = [\"a,b\"]\n");
    assert!(e.contains("may not contain `,`"), "{e}");
    let e = err("max-tokens = 1979-05-27\n");
    assert!(e.contains("max-tokens"), "{e}");
    let e = err("not toml at all = = =\n");
    assert!(e.contains("not valid TOML"), "{e}");
}

#[test]
fn the_subcommand_is_found_past_global_options() {
    let root = command();
    let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
    assert_eq!(
        subcommand_of(&root, &argv(&["shoal", "worker", "--layers", "0..3"])).as_deref(),
        Some("worker")
    );
    assert_eq!(
        subcommand_of(&root, &argv(&["shoal", "--threads", "2", "-vv", "run"])).as_deref(),
        Some("run")
    );
    assert_eq!(
        subcommand_of(&root, &argv(&["shoal", "--config", "api", "status"])).as_deref(),
        Some("status")
    );
    assert_eq!(subcommand_of(&root, &argv(&["shoal", "--config=x.toml", "api"])).as_deref(), Some("api"));
    assert_eq!(subcommand_of(&root, &argv(&["shoal", "--help"])), None);
    assert_eq!(config_flag(&argv(&["shoal", "run", "--config", "a.toml"])), Some("a.toml".into()));
    assert_eq!(config_flag(&argv(&["shoal", "--config=b.toml", "run"])), Some("b.toml".into()));
    assert_eq!(config_flag(&argv(&["shoal", "run", "--", "--config", "c"])), None);
}

#[test]
fn toml_values_render_by_kind() {
    let root = command();
    let worker = root.find_subcommand("worker").expect("worker");
    let arg = |l: &str| worker.get_arguments().find(|a| a.get_long() == Some(l)).expect(l).clone();
    assert_eq!(toml_value(&arg("kv-budget-mib"), "2048"), "2048");
    assert_eq!(toml_value(&arg("drain-timeout"), "30"), "30");
    assert_eq!(toml_value(&arg("layers"), "auto"), "\"auto\"");
    assert_eq!(toml_value(&arg("relay"), "false"), "false");
    assert_eq!(toml_value(&arg("bind"), "127.0.0.1:0"), "\"127.0.0.1:0\"");
    assert_eq!(toml_value(&arg("model"), "a \"b\".gguf"), "'a \"b\".gguf'");
}
