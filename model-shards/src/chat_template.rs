//! Hugging Face chat templates rendered with minijinja.
//!
//! A [`ChatTemplate`] renders a conversation into the prompt text a chat model was trained
//! on, the way `transformers`' `apply_chat_template` does: Jinja with `trim_blocks` and
//! `lstrip_blocks`, Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, … via
//! `minijinja_contrib::pycompat`), a `raise_exception(msg)` function (→
//! [`ChatTemplateError::Raised`]), `strftime_now(fmt)` (UTC), a Python-compatible `tojson`
//! filter (`json.dumps(…, ensure_ascii=False)` formatting, `indent`/`sort_keys` supported) and
//! the variables `messages`, `add_generation_prompt`, `bos_token` and `eos_token`.
//!
//! Template sources come from GGUF metadata `tokenizer.chat_template`
//! ([`ChatTemplate::from_gguf`]) or from a `tokenizer_config.json`
//! or `chat_template.jinja` ([`ChatTemplate::from_hf_dir`], [`ChatTemplate::for_tokenizer`]).
//!
//! Known gap: Jinja's `{% break %}`/`{% continue %}` need minijinja's `loop_controls` feature,
//! which the crate does not enable; such templates fail with [`ChatTemplateError::Syntax`].

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::tokenizer::{Tokenizer, TokenizerConfig};

const TEMPLATE_NAME: &str = "chat_template";

/// Gemma's chat template (Gemma 3's `tokenizer_config.json`, for text content), used for a
/// Gemma GGUF that ships none: turns `<start_of_turn>user|model` … `<end_of_turn>`, the
/// system message prefixed to the first user turn, roles alternating from the user.
pub const GEMMA_TEMPLATE: &str = r#"{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"#;

/// Errors of chat-template compilation and rendering.
#[derive(Debug, thiserror::Error)]
pub enum ChatTemplateError {
    /// The template source does not compile.
    #[error("chat template does not compile: {message}")]
    Syntax {
        /// minijinja's description, with the line when known.
        message: String,
    },
    /// The template called `raise_exception(message)` (e.g. "Conversation roles must
    /// alternate user/assistant/user/assistant/...").
    #[error("chat template raised an exception: {message}")]
    Raised {
        /// The message passed to `raise_exception`.
        message: String,
    },
    /// Rendering failed for another reason (unknown filter, type error, …).
    #[error("chat template rendering failed: {message}")]
    Template {
        /// minijinja's description, with the line when known.
        message: String,
    },
    /// The template could not be read from a Hugging Face model directory.
    #[error("cannot read the chat template of {path}: {message}")]
    Config {
        /// The model directory.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A GGUF metadata key has an unexpected type.
    #[error("GGUF metadata key `{key}` is invalid: {message}")]
    InvalidMetadata {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
}

/// One chat message, as in the OpenAI / Hugging Face `messages` list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool`, …
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant message's tool calls, as Hugging Face templates take them:
    /// `[{"type": "function", "function": {"name", "arguments": {…}}, "id"}]` (arguments as an
    /// object, not OpenAI's string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<serde_json::Value>,
    /// A `tool` message's answer to this call id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), tool_calls: None, tool_call_id: None }
    }
}

/// A compiled chat template plus the `bos_token` / `eos_token` strings it may reference.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos: Option<String>,
    eos: Option<String>,
}

/// Marker carried as the source of the minijinja error raised by `raise_exception`.
#[derive(Debug)]
struct RaisedException(String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

impl ChatTemplate {
    /// Compiles `source` with Hugging Face-compatible settings; `bos` / `eos` are exposed to
    /// the template as `bos_token` / `eos_token` (empty strings when `None`).
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self, ChatTemplateError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| ChatTemplateError::Syntax { message: describe(&e) })?;
        Ok(Self { env, source: source.to_owned(), bos, eos })
    }

    /// The template shipped in GGUF metadata `tokenizer.chat_template`, with `bos_token` /
    /// `eos_token` taken from `tokenizer.ggml.{bos,eos}_token_id` and `tokenizer.ggml.tokens`.
    /// `Ok(None)` when the file has no chat template.
    /// A Gemma GGUF without a template gets [`GEMMA_TEMPLATE`].
    pub fn from_gguf(content: &Content) -> Result<Option<Self>, ChatTemplateError> {
        let md = &content.metadata;
        let is_gemma =
            matches!(md.get("general.architecture"), Some(GgufValue::String(a)) if a.starts_with("gemma"));
        let source = match md.get("tokenizer.chat_template") {
            None if is_gemma => GEMMA_TEMPLATE.to_owned(),
            None => return Ok(None),
            Some(GgufValue::String(s)) => s.clone(),
            Some(other) => {
                return Err(ChatTemplateError::InvalidMetadata {
                    key: "tokenizer.chat_template",
                    message: format!("expected a string, got {:?}", other.value_type()),
                });
            }
        };
        let tokens = match md.get("tokenizer.ggml.tokens") {
            Some(GgufValue::Array(tokens)) => tokens.as_slice(),
            _ => &[],
        };
        let token_text = |key: &str| -> Option<String> {
            let id = match md.get(key)? {
                GgufValue::U32(v) => usize::try_from(*v).ok()?,
                GgufValue::I32(v) => usize::try_from(*v).ok()?,
                GgufValue::U64(v) => usize::try_from(*v).ok()?,
                GgufValue::I64(v) => usize::try_from(*v).ok()?,
                _ => return None,
            };
            match tokens.get(id)? {
                GgufValue::String(s) => Some(s.clone()),
                _ => None,
            }
        };
        let bos = token_text("tokenizer.ggml.bos_token_id");
        let eos = token_text("tokenizer.ggml.eos_token_id");
        Self::new(&source, bos, eos).map(Some)
    }

    /// The template of a Hugging Face model directory: `tokenizer_config.json`'s
    /// `chat_template` (a string, or the `"default"` entry of a list of named templates) or
    /// `chat_template.jinja`, with the config's `bos_token` / `eos_token`. `Ok(None)` when the
    /// directory has no chat template.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Self>, ChatTemplateError> {
        let config = TokenizerConfig::from_hf_dir(dir)
            .map_err(|e| ChatTemplateError::Config { path: dir.to_path_buf(), message: e.to_string() })?;
        config.chat_template.map(|source| Self::new(&source, config.bos_token, config.eos_token)).transpose()
    }

    /// The template shipped with `tokenizer` (GGUF metadata or `tokenizer_config.json`), with
    /// its BOS/EOS token texts. `Ok(None)` when the tokenizer has no chat template.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Result<Option<Self>, ChatTemplateError> {
        tokenizer
            .chat_template()
            .map(|source| {
                Self::new(
                    source,
                    tokenizer.bos_token().map(str::to_owned),
                    tokenizer.eos_token().map(str::to_owned),
                )
            })
            .transpose()
    }

    /// Renders `messages`; with `add_generation_prompt` the template appends the header that
    /// opens the assistant's turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// [`ChatTemplate::render`] with the request's tools (OpenAI's list of
    /// `{"type": "function", "function": {…}}`) as the template's `tools` variable.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, ChatTemplateError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError::Template { message: describe(&e) })?;
        let ctx = context! {
            messages => messages,
            tools => tools,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
        };
        template.render(ctx).map_err(|e| match raised_message(&e) {
            Some(message) => ChatTemplateError::Raised { message },
            None => ChatTemplateError::Template { message: describe(&e) },
        })
    }

    /// Whether the template renders a request's tools itself (it reads a `tools` variable).
    pub fn takes_tools(&self) -> bool {
        self.source.contains("tools")
    }

    /// The template source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `bos_token` exposed to the template.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    /// The `eos_token` exposed to the template.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }
}

fn describe(e: &Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    out
}

fn raised_message(e: &Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(raised) = s.downcast_ref::<RaisedException>() {
            return Some(raised.0.clone());
        }
        source = s.source();
    }
    None
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone()).with_source(RaisedException(message)))
}

fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    Ok(Value::from(strftime(&format, i64::try_from(secs).unwrap_or(0))))
}

/// Formats a Unix time (UTC) with the common `strftime` directives
/// (`%Y %y %m %d %e %j %H %I %M %S %p %a %A %b %B %h %F %T %D %%`).
fn strftime(format: &str, unix_secs: i64) -> String {
    const DAYS: [&str; 7] = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"];
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs_of_day = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day % 3600 / 60, secs_of_day % 60);
    let weekday = usize::try_from((days + 4).rem_euclid(7)).unwrap_or(0);
    let yday = days - days_from_civil(year, 1, 1) + 1;
    let month_name = MONTHS.get(usize::try_from(month - 1).unwrap_or(0)).copied().unwrap_or("");
    let day_name = DAYS.get(weekday).copied().unwrap_or("");
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:>2}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('a') => write!(out, "{}", day_name.get(..3).unwrap_or(day_name)),
            Some('A') => write!(out, "{day_name}"),
            Some('b' | 'h') => write!(out, "{}", month_name.get(..3).unwrap_or(month_name)),
            Some('B') => write!(out, "{month_name}"),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('D') => write!(out, "{month:02}/{day:02}/{:02}", year.rem_euclid(100)),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// Days since 1970-01-01 → (year, month 1..=12, day 1..=31), proleptic Gregorian.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// (year, month, day) → days since 1970-01-01, proleptic Gregorian.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `tojson` as Hugging Face defines it: `json.dumps(value, ensure_ascii=False, indent=…,
/// sort_keys=…)`, i.e. Python's `", "` / `": "` separators and non-ASCII kept verbatim.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => Some(" ".repeat(usize::try_from(n).unwrap_or(0))),
            (None, Some(s)) => Some(s.to_owned()),
            _ => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: indent must be an integer or a string",
                ));
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(seps) if !seps.is_none() && !seps.is_undefined() => {
            let item = seps.get_item(&Value::from(0))?;
            let key = seps.get_item(&Value::from(1))?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => (i.to_owned(), k.to_owned()),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be a pair of strings",
                    ));
                }
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let opts = JsonOptions {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(&mut out, value, &opts, 0)?;
    Ok(Value::from(out))
}

struct JsonOptions {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

fn write_json(out: &mut String, value: &Value, opts: &JsonOptions, depth: usize) -> Result<(), Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => write_number(out, value),
        ValueKind::String | ValueKind::Plain => {
            write_json_string(out, &value.to_string(), opts.ensure_ascii);
        }
        ValueKind::Bytes => write_json_string(
            out,
            &String::from_utf8_lossy(value.as_bytes().unwrap_or(&[])),
            opts.ensure_ascii,
        ),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, opts, depth, '[', ']', &items, |out, item| {
                write_json(out, item, opts, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((json_key(&key), item));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, opts, depth, '{', '}', &entries, |out, (key, item)| {
                write_json_string(out, key, opts.ensure_ascii);
                out.push_str(&opts.key_sep);
                write_json(out, item, opts, depth + 1)
            })?;
        }
        ValueKind::Invalid => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize invalid value {value}"),
            ));
        }
        _ => write_json_string(out, &value.to_string(), opts.ensure_ascii),
    }
    Ok(())
}

fn write_container<T>(
    out: &mut String,
    opts: &JsonOptions,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&opts.item_sep);
        }
        if let Some(indent) = &opts.indent {
            out.push('\n');
            out.push_str(&indent.repeat(depth + 1));
        }
        write_item(out, item)?;
    }
    if let Some(indent) = &opts.indent {
        out.push('\n');
        out.push_str(&indent.repeat(depth));
    }
    out.push(close);
    Ok(())
}

/// Python's `json.dumps` key coercion: strings stay, `None`/bools/numbers are stringified.
fn json_key(key: &Value) -> String {
    match key.kind() {
        ValueKind::None | ValueKind::Undefined => "null".to_owned(),
        ValueKind::Bool => if key.is_true() { "true" } else { "false" }.to_owned(),
        ValueKind::Number => {
            let mut s = String::new();
            write_number(&mut s, key);
            s
        }
        _ => key.to_string(),
    }
}

/// Python `repr`-style numbers: integers as is, floats always with a `.` or an exponent.
fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        out.push_str(&value.to_string());
        return;
    }
    let Ok(f) = f64::try_from(value.clone()) else {
        out.push_str(&value.to_string());
        return;
    };
    if f.is_nan() {
        out.push_str("NaN");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" });
    } else if f != 0.0 && (f.abs() >= 1e16 || f.abs() < 1e-4) {
        // Python: 1e+16, 1.5e-05
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = match exp.strip_prefix('-') {
            Some(d) => ('-', d),
            None => ('+', exp),
        };
        let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
    } else if f.fract() == 0.0 {
        let _ = write!(out, "{f:.1}");
    } else {
        let _ = write!(out, "{f}");
    }
}

fn write_json_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0C}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !c.is_ascii()) => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str, messages: &[ChatMessage]) -> Result<String, ChatTemplateError> {
        ChatTemplate::new(src, Some("<s>".into()), Some("</s>".into()))?.render(messages, true)
    }

    #[test]
    fn hf_features() -> Result<(), ChatTemplateError> {
        let msgs = [ChatMessage::new("user", "  hi  ")];
        let out = render(
            "{{ bos_token }}{% for m in messages %}\n  {% if m.role.startswith('us') %}\n[{{ m['content'].strip() }}]{% endif %}\n{% endfor %}\n{% if add_generation_prompt %}>{% endif %}{{ eos_token }}",
            &msgs,
        )?;
        assert_eq!(out, "<s>[hi]></s>");
        Ok(())
    }

    #[test]
    fn raise_exception_is_typed() {
        let msgs = [ChatMessage::new("assistant", "x")];
        let err = render(
            "{% if messages[0].role != 'user' %}{{ raise_exception('roles must alternate') }}{% endif %}",
            &msgs,
        );
        match err {
            Err(ChatTemplateError::Raised { message }) => assert_eq!(message, "roles must alternate"),
            other => panic!("expected Raised, got {other:?}"),
        }
        assert!(matches!(ChatTemplate::new("{% if %}", None, None), Err(ChatTemplateError::Syntax { .. })));
    }

    #[test]
    fn tojson_is_python_style() -> Result<(), ChatTemplateError> {
        let out = render(
            "{{ {'a': 1, 'b': [1.0, 2.5, none, true], 'c': 'é\"\n'} | tojson }}|{{ [1, {'x': 2}] | tojson(indent=2) }}",
            &[],
        )?;
        assert_eq!(
            out,
            "{\"a\": 1, \"b\": [1.0, 2.5, null, true], \"c\": \"é\\\"\\n\"}|[\n  1,\n  {\n    \"x\": 2\n  }\n]"
        );
        Ok(())
    }

    #[test]
    fn strftime_directives() {
        // 2024-07-04 13:05:09 UTC, a Thursday.
        let t = 1_720_098_309;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %b %d %B %A %j %I%p %%", t),
            "2024-07-04 13:05:09 Thu Jul 04 July Thursday 186 01PM %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        assert!(ChatTemplate::new("{{ strftime_now('%Y') }}", None, None).is_ok());
    }
}
