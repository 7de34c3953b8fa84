//! The config file: every flag of every command, in TOML, and `shoal config print`.
//!
//! Keys are long flag names without their dashes (`kv-budget-mib = 1024`). At the top level a
//! key applies to every command that has that flag; in a `[COMMAND]` table (`[worker]`,
//! `[api]`, ...) it applies to that command only and overrides the top level. Values are TOML
//! strings, numbers, booleans (for switches such as `relay`) or arrays (for repeatable flags
//! such as `join`). A key that no command has, or a value its flag refuses, is an error that
//! names the key.
//!
//! Precedence: flag > environment variable > file > default. Every flag has an environment
//! twin, so the file is applied before clap parses: each key's value goes into its flag's
//! environment variable unless that variable is already set, and clap's own precedence (a flag
//! over its variable over its default) does the rest.
//!
//! The file is `--config FILE`, else `$SHOAL_CONFIG`, else the first that exists of
//! `$XDG_CONFIG_HOME/shoal/config.toml` (or `~/.config/shoal/config.toml`) and
//! `/etc/shoal/config.toml`. A file named by `--config` or `SHOAL_CONFIG` must exist.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result, anyhow, bail};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, Command, CommandFactory};
use toml_edit::{DocumentMut, Value};

use crate::cli::Cli;

/// The environment variable naming the config file.
pub const CONFIG_ENV: &str = "SHOAL_CONFIG";

/// Subcommands that take no settings from the file.
const NOT_SETTABLE: &[&str] = &["config", "swarm", "help"];

/// Environment variables this process set from the file (so `config print` can tell "file"
/// from "env").
static FROM_FILE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// One setting of the file: its values as the flag would take them on the command line.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    values: Vec<String>,
}

/// A parsed, validated config file.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    /// Where it was read from.
    pub path: PathBuf,
    top: BTreeMap<String, Setting>,
    sections: BTreeMap<String, BTreeMap<String, Setting>>,
}

/// The whole CLI with global flags propagated into every subcommand.
pub fn command() -> Command {
    let mut cmd = Cli::command();
    cmd.build();
    cmd
}

/// Whether `arg` is a setting (a long flag that is not help, version or `--config`).
fn is_setting(arg: &Arg) -> bool {
    arg.get_long().is_some_and(|l| l != "config")
        && !matches!(
            arg.get_action(),
            ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
        )
}

/// The settable subcommands.
fn commands(root: &Command) -> impl Iterator<Item = &Command> {
    root.get_subcommands().filter(|c| !NOT_SETTABLE.contains(&c.get_name()))
}

/// The value of `--config FILE` / `--config=FILE` among the arguments (before a `--`).
fn config_flag(argv: &[OsString]) -> Option<OsString> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        if a == "--" {
            break;
        }
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.to_str().and_then(|s| s.strip_prefix("--config=")) {
            return Some(v.into());
        }
    }
    None
}

/// The subcommand the arguments run (its name), skipping global options and their values.
pub fn subcommand_of(root: &Command, argv: &[OsString]) -> Option<String> {
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_str()?;
        if s == "--" {
            return None;
        }
        if let Some(long) = s.strip_prefix("--") {
            let takes_value = !long.contains('=')
                && root.get_arguments().any(|g| g.get_long() == Some(long) && g.get_action().takes_values());
            if takes_value {
                it.next();
            }
            continue;
        }
        if s.starts_with('-') {
            continue;
        }
        return root.find_subcommand(s).map(|c| c.get_name().to_owned());
    }
    None
}

/// The default locations, in order.
fn default_paths() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    let xdg = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()).map(PathBuf::from);
    let home = std::env::var_os("HOME").filter(|v| !v.is_empty()).map(|h| PathBuf::from(h).join(".config"));
    if let Some(dir) = xdg.or(home) {
        paths.push(dir.join("shoal/config.toml"));
    }
    paths.push(PathBuf::from("/etc/shoal/config.toml"));
    paths
}

/// Finds and reads the config file for these arguments: `None` when none is named and no
/// default location holds one.
pub fn discover(root: &Command, argv: &[OsString]) -> Result<Option<ConfigFile>> {
    let named = config_flag(argv).or_else(|| std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty()));
    let path = match named {
        Some(p) => PathBuf::from(p),
        None => match default_paths().into_iter().find(|p| p.is_file()) {
            Some(p) => p,
            None => return Ok(None),
        },
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading the config file {}", path.display()))?;
    ConfigFile::parse(&path, &text, root).map(Some)
}

impl ConfigFile {
    /// Parses and validates `text` (read from `path`) against the CLI `root`.
    pub fn parse(path: &Path, text: &str, root: &Command) -> Result<Self> {
        let at = path.display();
        let doc: DocumentMut = text.parse().map_err(|e| anyhow!("{at}: not valid TOML: {e}"))?;
        let mut top = BTreeMap::new();
        let mut sections = BTreeMap::new();
        for (key, item) in doc.iter() {
            if let Some(table) = item.as_table_like() {
                let Some(sub) = commands(root).find(|c| c.get_name() == key) else {
                    let names: Vec<&str> = commands(root).map(Command::get_name).collect();
                    bail!("{at}: unknown table [{key}] (the tables are commands: {})", names.join(", "));
                };
                let mut settings = BTreeMap::new();
                for (k, it) in table.iter() {
                    let Some(value) = it.as_value() else {
                        bail!("{at}: [{key}] {k}: a table inside a command's table is not a setting");
                    };
                    let Some(arg) = sub.get_arguments().find(|a| is_setting(a) && a.get_long() == Some(k))
                    else {
                        bail!("{at}: unknown key `{k}` in [{key}]: shoal {key} has no --{k} flag{}", hint(k));
                    };
                    settings
                        .insert(k.to_owned(), setting(path, &format!("[{key}] {k}"), value, &[(sub, arg)])?);
                }
                sections.insert(key.to_owned(), settings);
            } else if let Some(value) = item.as_value() {
                let owners: Vec<(&Command, &Arg)> = std::iter::once(root)
                    .chain(commands(root))
                    .flat_map(|c| c.get_arguments().map(move |a| (c, a)))
                    .filter(|(_, a)| is_setting(a) && a.get_long() == Some(key))
                    .collect();
                if owners.is_empty() {
                    bail!("{at}: unknown key `{key}`: no shoal command has a --{key} flag{}", hint(key));
                }
                top.insert(key.to_owned(), setting(path, key, value, &owners)?);
            } else {
                bail!("{at}: `{key}`: arrays of tables are not settings");
            }
        }
        Ok(Self { path: path.to_owned(), top, sections })
    }

    /// The environment variables and values this file gives `command` (top level first,
    /// overridden by the command's table).
    fn env_for(&self, root: &Command, command: &str) -> Vec<(String, String)> {
        let Some(sub) = root.find_subcommand(command) else { return Vec::new() };
        let section = self.sections.get(command);
        let mut out = Vec::new();
        for arg in sub.get_arguments().filter(|a| is_setting(a)) {
            let (Some(long), Some(env)) = (arg.get_long(), arg.get_env()) else { continue };
            let Some(setting) = section.and_then(|s| s.get(long)).or_else(|| self.top.get(long)) else {
                continue;
            };
            if setting.values.is_empty() {
                // `join = []`: the flag not given.
                continue;
            }
            let delimiter = arg.get_value_delimiter().unwrap_or(',');
            out.push((env.to_string_lossy().into_owned(), setting.values.join(&delimiter.to_string())));
        }
        out
    }

    /// Puts this file's settings for `command` into the environment, skipping variables that
    /// are already set; returns the variables it set.
    ///
    /// # Safety
    /// No other thread may read or write the environment meanwhile (call it before any thread
    /// starts).
    pub unsafe fn apply(&self, root: &Command, command: &str) -> Vec<String> {
        let mut set = Vec::new();
        for (name, value) in self.env_for(root, command) {
            if std::env::var_os(&name).is_none() {
                // SAFETY: the caller guarantees no other thread touches the environment.
                unsafe { std::env::set_var(&name, &value) };
                set.push(name);
            }
        }
        FROM_FILE.lock().unwrap_or_else(PoisonError::into_inner).extend(set.iter().cloned());
        set
    }
}

/// A hint for a key written with underscores.
fn hint(key: &str) -> String {
    if key.contains('_') {
        format!(" (flags are written with dashes: `{}`)", key.replace('_', "-"))
    } else {
        String::new()
    }
}

/// Converts one TOML value into the flag's values and checks them with every flag of that
/// name (`owners`): the error names the key.
fn setting(path: &Path, key: &str, value: &Value, owners: &[(&Command, &Arg)]) -> Result<Setting> {
    let at = path.display();
    let scalar = |v: &Value| -> Result<String> {
        Ok(match v {
            Value::String(s) => s.value().clone(),
            Value::Integer(i) => i.value().to_string(),
            Value::Float(f) => f.value().to_string(),
            Value::Boolean(b) => b.value().to_string(),
            Value::Array(_) => bail!("{at}: `{key}`: a list inside a list"),
            Value::Datetime(_) | Value::InlineTable(_) => {
                bail!("{at}: `{key}`: takes a string, a number or a boolean")
            }
        })
    };
    let (values, is_list) = match value {
        Value::Array(a) => (a.iter().map(scalar).collect::<Result<Vec<_>>>()?, true),
        v => (vec![scalar(v)?], false),
    };
    for (cmd, arg) in owners {
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        if is_list && !repeatable {
            bail!("{at}: `{key}` takes one value, not a list");
        }
        let delimiter = arg.get_value_delimiter().unwrap_or(',');
        if values.iter().any(|v| is_list && v.contains(delimiter)) {
            bail!("{at}: `{key}`: a value may not contain `{delimiter}`");
        }
        for v in &values {
            check_value(cmd, arg, v)
                .map_err(|e| anyhow!("{at}: `{key} = {}`: {e}", value.to_string().trim()))?;
        }
    }
    Ok(Setting { values })
}

/// Checks `value` with `arg`'s own parser, as if it were given on `cmd`'s command line.
fn check_value(cmd: &Command, arg: &Arg, value: &str) -> std::result::Result<(), String> {
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            return match value {
                "true" | "false" => Ok(()),
                _ => Err("a switch: true or false".into()),
            };
        }
        ArgAction::Count => {
            return value.parse::<u8>().map(drop).map_err(|_| "a count: 0, 1, 2...".into());
        }
        _ => {}
    }
    let Some(long) = arg.get_long() else { return Ok(()) };
    let probe = relaxed(cmd).no_binary_name(true);
    match probe.try_get_matches_from([format!("--{long}={value}")]) {
        Ok(_) => Ok(()),
        Err(e) => {
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or_default();
            Err(first.strip_prefix("error: ").unwrap_or(first).to_owned())
        }
    }
}

/// `cmd` with nothing required and no environment variables, to parse a subset of flags.
fn relaxed(cmd: &Command) -> Command {
    let groups: Vec<String> = cmd.get_groups().map(|g| g.get_id().to_string()).collect();
    let mut c = cmd.clone().subcommand_required(false).mut_args(|a| a.required(false).env(None::<&str>));
    for g in groups {
        c = c.mut_group(g, |g| g.required(false));
    }
    c
}

/// Renders a flag's value as TOML.
fn toml_value(arg: &Arg, raw: &str) -> String {
    let numeric = raw.parse::<f64>().is_ok_and(f64::is_finite)
        && raw.chars().all(|c| c.is_ascii_digit() || ".-+eE".contains(c));
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count => raw.to_owned(),
        _ if numeric => raw.to_owned(),
        _ => Value::from(raw).to_string().trim().to_owned(),
    }
}

/// `shoal config print [COMMAND [FLAGS...]]`: the effective settings, as a config file whose
/// comments say where each value came from.
pub fn print(file: Option<&ConfigFile>, command: Option<&str>, args: &[String]) -> Result<String> {
    let root = command_for_print();
    let names: Vec<String> = match command {
        Some(c) => {
            let Some(sub) = commands(&root).find(|s| s.get_name() == c) else {
                let names: Vec<&str> = commands(&root).map(Command::get_name).collect();
                bail!("no command `{c}` (the commands: {})", names.join(", "));
            };
            vec![sub.get_name().to_owned()]
        }
        None => {
            if !args.is_empty() {
                bail!("flags go after a command: shoal config print COMMAND FLAGS...");
            }
            commands(&root).map(|c| c.get_name().to_owned()).collect()
        }
    };
    let mut out = String::new();
    let origin =
        file.map_or_else(|| "no config file".to_owned(), |f| format!("config file {}", f.path.display()));
    writeln!(out, "# Effective settings (flag > env > file > default); {origin}.")?;
    for name in names {
        let set = match file {
            // SAFETY: `config print` runs on the main thread before any other thread starts.
            Some(f) => unsafe { f.apply(&root, &name) },
            None => Vec::new(),
        };
        let result = section(&name, args);
        for var in &set {
            // SAFETY: as above.
            unsafe { std::env::remove_var(var) };
        }
        out.push_str(&result?);
    }
    Ok(out)
}

/// The CLI, built again so that its flags see the environment as it is now.
fn command_for_print() -> Command {
    command()
}

/// One command's table for `config print`.
fn section(name: &str, args: &[String]) -> Result<String> {
    let root = command_for_print();
    let sub = root.find_subcommand(name).with_context(|| format!("no command `{name}`"))?;
    let matches = relaxed_with_env(sub)
        .try_get_matches_from(std::iter::once(name.to_owned()).chain(args.iter().cloned()))
        .map_err(|e| anyhow!("{}", e.render().to_string().trim_end()))?;
    let from_file = FROM_FILE.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let mut out = format!("\n[{name}]\n");
    for arg in sub.get_arguments().filter(|a| is_setting(a)) {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else { continue };
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => "flag".to_owned(),
            Some(ValueSource::EnvVariable) if from_file.contains(&env) => format!("file, via {env}"),
            Some(ValueSource::EnvVariable) => format!("env {env}"),
            Some(ValueSource::DefaultValue) => "default".to_owned(),
            _ => {
                writeln!(out, "# {long} = (unset; env {env})")?;
                continue;
            }
        };
        let raw: Vec<String> = matches
            .get_raw(id)
            .map(|vals| vals.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let value = if arg.is_hide_env_values_set() {
            "\"(hidden)\"".to_owned()
        } else if matches!(arg.get_action(), ArgAction::Append) {
            format!("[{}]", raw.iter().map(|r| toml_value(arg, r)).collect::<Vec<_>>().join(", "))
        } else {
            raw.first().map_or_else(|| "\"\"".to_owned(), |r| toml_value(arg, r))
        };
        writeln!(out, "{long} = {value}  # {source}")?;
    }
    Ok(out)
}

/// `cmd` with nothing required (so that a partial command line shows its settings) but its
/// environment variables kept.
fn relaxed_with_env(cmd: &Command) -> Command {
    let groups: Vec<String> = cmd.get_groups().map(|g| g.get_id().to_string()).collect();
    let mut c = cmd.clone().mut_args(|a| a.required(false));
    for g in groups {
        c = c.mut_group(g, |g| g.required(false));
    }
    c
}

#[cfg(test)]
mod tests;
