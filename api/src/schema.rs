//! Request bodies as OpenAI sends them, and their validation into a [`Job`]: everything a
//! generation needs, checked before anything is admitted or computed.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use serde::Deserialize;
use shoal_model_shards::chat_template::ChatMessage;
use shoal_model_shards::sampler::{SamplerError, SamplingParams};

use crate::grammar::{Grammar, GuidedFields, Spec};
use crate::tools::{Syntax, ToolRequest};
use crate::{ApiError, ApiState};

/// Most alternatives per token (`top_logprobs`, or the completions endpoint's `logprobs`).
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// Most stop sequences (OpenAI's limit).
pub const MAX_STOPS: usize = 4;
/// Longest stop sequence, in characters.
pub const MAX_STOP_CHARS: usize = 256;

/// `stop`: a string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// A JSON number that must be an integer (OpenAI's `seed` may be negative).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Int {
    Unsigned(u64),
    Signed(i64),
}

/// The fields both endpoints share.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Common {
    pub(crate) model: Option<String>,
    pub(crate) max_tokens: Option<i64>,
    pub(crate) max_completion_tokens: Option<i64>,
    pub(crate) temperature: Option<f64>,
    pub(crate) top_p: Option<f64>,
    pub(crate) top_k: Option<i64>,
    pub(crate) min_p: Option<f64>,
    pub(crate) seed: Option<Int>,
    pub(crate) stop: Option<Stop>,
    pub(crate) presence_penalty: Option<f64>,
    pub(crate) frequency_penalty: Option<f64>,
    pub(crate) repetition_penalty: Option<f64>,
    pub(crate) n: Option<i64>,
    pub(crate) stream: Option<bool>,
    pub(crate) stream_options: Option<StreamOptions>,
    /// vLLM's: generate past the end-of-sequence ids, up to `max_tokens` (for benchmarks).
    pub(crate) ignore_eos: Option<bool>,
    /// Accepted and logged (OpenAI's end-user id).
    pub(crate) user: Option<String>,
    /// Structured output ([`crate::grammar`]).
    #[serde(flatten)]
    pub(crate) guided: GuidedFields,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct InMessage {
    role: String,
    content: Option<Content>,
    /// An assistant message's calls.
    tool_calls: Option<serde_json::Value>,
    /// A `tool` message's call.
    tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatBody {
    pub(crate) messages: Vec<InMessage>,
    logprobs: Option<bool>,
    top_logprobs: Option<i64>,
    tools: Option<Vec<serde_json::Value>>,
    tool_choice: Option<serde_json::Value>,
    parallel_tool_calls: Option<bool>,
    #[serde(flatten)]
    pub(crate) common: Common,
}

/// A completions prompt: text or token ids, one of them (lists of one are accepted).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<u32>>),
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionBody {
    pub(crate) prompt: Prompt,
    logprobs: Option<i64>,
    echo: Option<bool>,
    best_of: Option<i64>,
    suffix: Option<String>,
    #[serde(flatten)]
    pub(crate) common: Common,
}

/// Which endpoint's shapes to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Chat,
    Completion,
    /// Anthropic's Messages API ([`crate::anthropic`]).
    Messages,
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub(crate) struct Job {
    pub(crate) kind: Kind,
    pub(crate) prompt: Vec<u32>,
    /// Sampling of choice 0; choice `i` uses `seed + i`.
    pub(crate) params: SamplingParams,
    pub(crate) max_tokens: usize,
    pub(crate) stops: Vec<String>,
    pub(crate) n: usize,
    /// Report logprobs, with this many alternatives per token.
    pub(crate) logprobs: Option<u8>,
    pub(crate) stream: bool,
    pub(crate) include_usage: bool,
    /// Generate past the end-of-sequence ids (only `max_tokens` and stop strings end it).
    pub(crate) ignore_eos: bool,
    /// The grammar the output follows (structured outputs, or calls that must be made).
    pub(crate) grammar: Option<Grammar>,
    /// The syntax of calls to read from the output, when tools may be called.
    pub(crate) tools: Option<(Syntax, bool)>,
}

/// Reads a JSON body (the size limit already applied by axum).
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| {
        let status = r.status();
        let mut e = ApiError::invalid(r.body_text(), None);
        e.status = status;
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            e.code = Some("request_too_large");
        }
        e
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::invalid(format!("invalid request body: {e}"), None))
}

fn sampler_error(e: SamplerError) -> ApiError {
    match e {
        SamplerError::InvalidParameter { name, .. } => ApiError::invalid(e.to_string(), Some(name)),
        other => ApiError::invalid(other.to_string(), None),
    }
}

/// A finite `f64` that fits an `f32`, or a 400 naming the field.
fn float(v: Option<f64>, default: f32, name: &'static str) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x.abs() <= f64::from(f32::MAX) => {
            let f = x as f32;
            // A positive value too small for an f32 stays positive (top_p and
            // repetition_penalty exclude 0; schemathesis found 5e-324).
            Ok(if x > 0.0 && f == 0.0 { f32::MIN_POSITIVE } else { f })
        }
        Some(x) => Err(ApiError::invalid(format!("{name} = {x} is out of range"), Some(name))),
    }
}

impl ChatBody {
    /// The request's tools, when the model may call some.
    pub(crate) fn tool_request(&self) -> Result<Option<ToolRequest>, ApiError> {
        ToolRequest::parse(self.tools.as_deref(), self.tool_choice.as_ref(), self.parallel_tool_calls)
    }

    /// The messages as the chat template takes them: with `native_tools` the template
    /// renders calls and tool results itself, otherwise they are written in the fallback's
    /// form ([`crate::tools`]).
    pub(crate) fn chat_messages(&mut self, native_tools: bool) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid("messages must not be empty", Some("messages")));
        }
        let mut out: Vec<ChatMessage> = Vec::with_capacity(self.messages.len());
        // Whether a `tool` message may come next: after calls, or after another result.
        let mut answering = false;
        for m in self.messages.drain(..) {
            let role = match m.role.as_str() {
                "system" | "user" | "assistant" | "tool" => m.role,
                // OpenAI's newer name for the system role.
                "developer" => "system".to_owned(),
                other => {
                    return Err(ApiError::invalid(
                        format!("role `{other}` is not supported (system, developer, user, assistant, tool)"),
                        Some("messages"),
                    ));
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        if p.kind != "text" {
                            return Err(ApiError::invalid(
                                format!("content parts of type `{}` are not supported", p.kind),
                                Some("messages"),
                            ));
                        }
                        let text = p.text.ok_or_else(|| {
                            ApiError::invalid("a text content part needs `text`", Some("messages"))
                        })?;
                        s.push_str(&text);
                    }
                    s
                }
            };
            let mut msg = ChatMessage::new(role, content);
            let has_calls =
                m.tool_calls.as_ref().is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()));
            if let Some(calls) = m.tool_calls.filter(|c| !c.is_null()) {
                if msg.role != "assistant" {
                    return Err(ApiError::invalid(
                        "only assistant messages carry tool_calls",
                        Some("messages"),
                    ));
                }
                let calls = crate::tools::template_calls(&calls)?;
                if native_tools {
                    msg.tool_calls = Some(calls);
                } else {
                    msg.content.push_str(&crate::tools::fallback_calls_text(&calls));
                }
            }
            let is_tool = msg.role == "tool";
            if is_tool {
                if !answering {
                    return Err(ApiError::invalid(
                        "a message with role `tool` must answer a preceding assistant message with tool_calls",
                        Some("messages"),
                    ));
                }
                if m.tool_call_id.is_none() {
                    return Err(ApiError::invalid(
                        "a `tool` message needs its tool_call_id",
                        Some("messages"),
                    ));
                }
                if native_tools {
                    msg.tool_call_id = m.tool_call_id;
                } else {
                    msg.role = "user".into();
                    msg.content = format!("<tool_response>\n{}\n</tool_response>", msg.content);
                }
            }
            answering = (msg.role == "assistant" && has_calls) || (is_tool && answering);
            out.push(msg);
        }
        Ok(out)
    }

    /// `logprobs` / `top_logprobs` as the job takes them.
    pub(crate) fn logprobs(&self) -> Result<Option<u8>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0);
        if !(0..=MAX_TOP_LOGPROBS).contains(&top) {
            return Err(ApiError::invalid(
                format!("top_logprobs must be within [0, {MAX_TOP_LOGPROBS}]"),
                Some("top_logprobs"),
            ));
        }
        match self.logprobs {
            Some(true) => Ok(Some(top as u8)),
            _ if top > 0 => Err(ApiError::invalid("top_logprobs needs logprobs: true", Some("top_logprobs"))),
            _ => Ok(None),
        }
    }
}

impl CompletionBody {
    /// The prompt's token ids.
    pub(crate) fn prompt_ids(&mut self, state: &ApiState) -> Result<Vec<u32>, ApiError> {
        if self.echo == Some(true) {
            return Err(ApiError::invalid("echo is not supported", Some("echo")));
        }
        if self.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::invalid("only best_of = 1 is supported", Some("best_of")));
        }
        if self.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(ApiError::invalid("suffix is not supported", Some("suffix")));
        }
        let encode = |t: &str| {
            state
                .model
                .tokenizer
                .encode(t, true)
                .map_err(|e| ApiError::invalid(e.to_string(), Some("prompt")))
        };
        let one = || ApiError::invalid("exactly one prompt per request is supported", Some("prompt"));
        let ids = match std::mem::replace(&mut self.prompt, Prompt::Ids(Vec::new())) {
            Prompt::Text(s) => encode(&s)?,
            Prompt::Ids(ids) => ids,
            Prompt::Texts(v) => match <[String; 1]>::try_from(v) {
                Ok([s]) => encode(&s)?,
                Err(_) => return Err(one()),
            },
            Prompt::IdLists(v) => match <[Vec<u32>; 1]>::try_from(v) {
                Ok([ids]) => ids,
                Err(_) => return Err(one()),
            },
        };
        let vocab = state.model.tokenizer.vocab_size();
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(ApiError::invalid(
                format!("token id {bad} is outside the vocabulary of {vocab} ids"),
                Some("prompt"),
            ));
        }
        Ok(ids)
    }

    /// `logprobs` (an integer here) as the job takes it.
    pub(crate) fn logprobs(&self) -> Result<Option<u8>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(k) if (0..=MAX_TOP_LOGPROBS).contains(&k) => Ok(Some(k as u8)),
            Some(_) => Err(ApiError::invalid(
                format!("logprobs must be within [0, {MAX_TOP_LOGPROBS}]"),
                Some("logprobs"),
            )),
        }
    }
}

impl ApiState {
    /// Validates the shared fields of a request whose prompt is `prompt`.
    pub(crate) fn job(
        &self,
        kind: Kind,
        prompt: Vec<u32>,
        c: Common,
        logprobs: Option<u8>,
        prompt_param: &'static str,
        tools: Option<(ToolRequest, Syntax)>,
    ) -> Result<Job, ApiError> {
        if let Some(m) = &c.model
            && m != &self.model.name
        {
            return Err(ApiError::not_found(
                format!("the model `{m}` does not exist; this node serves `{}`", self.model.name),
                Some("model"),
                "model_not_found",
            ));
        }
        if let Some(user) = &c.user {
            tracing::debug!(user = %user.chars().take(64).collect::<String>(), "request");
        }
        let max_n = self.max_n();
        let n = match c.n {
            None => 1,
            Some(n) if n >= 1 && n as u64 <= max_n as u64 => n as usize,
            Some(_) => return Err(ApiError::invalid(format!("n must be within [1, {max_n}]"), Some("n"))),
        };
        if prompt.is_empty() {
            return Err(ApiError::invalid("the prompt is empty", Some(prompt_param)));
        }
        let context = self.max_positions();
        let room = context.saturating_sub(prompt.len());
        if room == 0 {
            return Err(ApiError::invalid(
                format!("the prompt has {} tokens; the model's context is {context} positions", prompt.len()),
                Some(prompt_param),
            ));
        }
        for (v, name) in [(c.max_tokens, "max_tokens"), (c.max_completion_tokens, "max_completion_tokens")] {
            if v.is_some_and(|n| n < 1) {
                return Err(ApiError::invalid(format!("{name} must be at least 1"), Some(name)));
            }
        }
        let (max_tokens, param) = match (c.max_completion_tokens, c.max_tokens) {
            (Some(n), _) => (Some(n), "max_completion_tokens"),
            (None, n) => (n, "max_tokens"),
        };
        let max_tokens = match max_tokens {
            None => room,
            Some(n) if n < 1 => {
                return Err(ApiError::invalid(format!("{param} must be at least 1"), Some(param)));
            }
            Some(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > room {
                    return Err(ApiError::invalid(
                        format!(
                            "the prompt ({} tokens) plus {param} ({n}) exceeds the model's context of {context} positions",
                            prompt.len()
                        ),
                        Some(param),
                    ));
                }
                n
            }
        };
        let d = self.sampling_defaults();
        let top_k = match c.top_k {
            None => d.top_k.filter(|&k| k > 0),
            Some(0) | Some(-1) => None,
            Some(k) if k > 0 => Some(u32::try_from(k).unwrap_or(u32::MAX)),
            Some(_) => return Err(ApiError::invalid("top_k must be -1, 0 or positive", Some("top_k"))),
        };
        let seed = match c.seed {
            Some(Int::Unsigned(s)) => s,
            // Two's complement: distinct negative seeds stay distinct.
            Some(Int::Signed(s)) => s as u64,
            None => rand::random(),
        };
        let params = SamplingParams {
            temperature: float(c.temperature, d.temperature.unwrap_or(1.0), "temperature")?,
            top_k,
            top_p: float(c.top_p, d.top_p.unwrap_or(1.0), "top_p")?,
            min_p: float(c.min_p, d.min_p.unwrap_or(0.0), "min_p")?,
            repetition_penalty: float(
                c.repetition_penalty,
                d.repetition_penalty.unwrap_or(1.0),
                "repetition_penalty",
            )?,
            presence_penalty: float(c.presence_penalty, 0.0, "presence_penalty")?,
            frequency_penalty: float(c.frequency_penalty, 0.0, "frequency_penalty")?,
            seed,
        };
        params.validate().map_err(sampler_error)?;
        let stops = match c.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s],
            Some(Stop::Many(v)) => v,
        };
        if stops.len() > MAX_STOPS {
            return Err(ApiError::invalid(format!("at most {MAX_STOPS} stop sequences"), Some("stop")));
        }
        if stops.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
            return Err(ApiError::invalid(
                format!("a stop sequence is longer than {MAX_STOP_CHARS} characters"),
                Some("stop"),
            ));
        }
        let stream = c.stream.unwrap_or(false);
        let spec = Spec::of_request(&c.guided)?;
        let grammar = match (spec, &tools) {
            (Some(_), Some(t)) if t.0.constrained() => {
                return Err(ApiError::invalid(
                    "response_format and guided fields cannot be combined with a tool_choice that forces calls",
                    Some("tool_choice"),
                ));
            }
            (Some(spec), _) => Some(self.grammars.compile(&spec)?),
            (None, Some((t, syntax))) if t.constrained() => {
                Some(self.grammars.compile(&Spec::Lark { grammar: t.grammar(*syntax), param: "tools" })?)
            }
            (None, _) => None,
        };
        Ok(Job {
            kind,
            prompt,
            params,
            max_tokens,
            stops,
            n,
            logprobs,
            stream,
            include_usage: stream && c.stream_options.and_then(|o| o.include_usage).unwrap_or(false),
            ignore_eos: c.ignore_eos.unwrap_or(false),
            grammar,
            tools: tools.map(|(t, syntax)| (syntax, t.constrained())),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_keep_their_sign_and_range() {
        assert_eq!(float(None, 1.0, "top_p").unwrap(), 1.0);
        assert_eq!(float(Some(0.5), 1.0, "top_p").unwrap(), 0.5);
        assert_eq!(float(Some(5e-324), 1.0, "top_p").unwrap(), f32::MIN_POSITIVE);
        assert_eq!(float(Some(0.0), 1.0, "temperature").unwrap(), 0.0);
        for bad in [1e39, -1e39, f64::MAX] {
            let e = float(Some(bad), 1.0, "temperature").unwrap_err();
            assert_eq!((e.status.as_u16(), e.param), (400, Some("temperature")));
        }
    }
}
