//! Tool calling on chat completions, in OpenAI's shapes: `tools`, `tool_choice` (`auto`,
//! `none`, `required`, or `{"type": "function", "function": {"name"}}`),
//! `parallel_tool_calls`, assistant messages with `tool_calls`, `tool` messages, and answers
//! whose `message.tool_calls` (or streamed `delta.tool_calls`) carry the calls with
//! `finish_reason: "tool_calls"`.
//!
//! **Prompt.** A chat template that reads a `tools` variable (Qwen2.5/3, Llama 3.1+,
//! Mistral, Hermes) renders the tools and the calls of earlier turns itself, with arguments as
//! objects as Hugging Face passes them. Other templates (SmolLM2's) get the fallback: a system
//! message listing the tools as JSON schemas and asking for
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>` blocks; earlier calls are
//! written back in that form and tool results as `<tool_response>` user turns.
//!
//! **Output.** The calls are read in the syntax the template teaches: `<tool_call>` blocks
//! (Qwen, Hermes and the fallback), a JSON array (Mistral, whose `[TOOL_CALLS]` marker is a
//! control token) or one JSON object with `name` and `parameters` (Llama 3.1). With `auto`
//! the model decides; its text is the answer's content unless it parses as calls. With
//! `required` or a named function the output is constrained by a grammar
//! ([`crate::grammar`]) to calls of the offered functions whose arguments satisfy their
//! parameters' schemas, whatever the model; object schemas that do not say otherwise are
//! closed to undeclared keys (`additionalProperties: false`), as in OpenAI's strict mode.
//!
//! **Streaming.** Text streams as content until it could be the start of a call; a call is
//! sent as `delta.tool_calls` entries (the id, type and name, then the arguments in pieces)
//! once its text is complete, so the streamed pieces reassemble into the same JSON.

use serde_json::{Map, Value, json};

use crate::ApiError;

/// Longest function name (OpenAI's limit).
const MAX_NAME: usize = 64;

/// A function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Tool {
    pub(crate) name: String,
    description: Option<String>,
    parameters: Value,
}

/// `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Choice {
    Auto,
    Required,
    Named(String),
}

/// How a template's model writes calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Syntax {
    /// `<tool_call>\n{"name", "arguments"}\n</tool_call>` blocks (Qwen, Hermes, fallback).
    Hermes,
    /// `[TOOL_CALLS][{"name", "arguments"}, …]` (Mistral).
    Mistral,
    /// One `{"name", "parameters"}` object (Llama 3.1+).
    Llama3,
}

impl Syntax {
    /// The syntax a chat template teaches (the fallback's when it reads no tools).
    pub(crate) fn of_template(source: &str, takes_tools: bool) -> Self {
        if !takes_tools || source.contains("<tool_call>") {
            Self::Hermes
        } else if source.contains("[TOOL_CALLS]") {
            Self::Mistral
        } else if source.contains("<|python_tag|>") || source.contains("ipython") {
            Self::Llama3
        } else {
            Self::Hermes
        }
    }

    /// Text that opens a call, when the output starts with it or (Hermes) contains it.
    fn markers(self) -> &'static [&'static str] {
        match self {
            Self::Hermes => &["<tool_call>"],
            Self::Mistral => &["[TOOL_CALLS]", "["],
            Self::Llama3 => &["<|python_tag|>", "{"],
        }
    }
}

/// The tools of a chat request, when the model may call them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ToolRequest {
    pub(crate) tools: Vec<Tool>,
    pub(crate) choice: Choice,
    pub(crate) parallel: bool,
}

fn bad(message: impl Into<String>, param: &'static str) -> ApiError {
    ApiError::invalid(message, Some(param))
}

impl ToolRequest {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tool may be
    /// called (no tools, or `tool_choice: "none"`).
    pub(crate) fn parse(
        tools: Option<&[Value]>,
        choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let mut parsed = Vec::new();
        for t in tools.unwrap_or_default() {
            if t.get("type").and_then(Value::as_str) != Some("function") {
                return Err(bad("each tool needs \"type\": \"function\"", "tools"));
            }
            let f = t.get("function").ok_or_else(|| bad("a tool needs a `function`", "tools"))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("a function needs a `name`", "tools"))?;
            let valid = !name.is_empty()
                && name.len() <= MAX_NAME
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !valid {
                return Err(bad(
                    format!("function name {name:?} must be 1 to {MAX_NAME} of a-z, A-Z, 0-9, _ and -"),
                    "tools",
                ));
            }
            if parsed.iter().any(|p: &Tool| p.name == name) {
                return Err(bad(format!("two tools are named {name:?}"), "tools"));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(bad(
                        format!("the parameters of {name:?} must be a JSON schema object"),
                        "tools",
                    ));
                }
            };
            let description = f.get("description").and_then(Value::as_str).map(str::to_owned);
            parsed.push(Tool { name: name.to_owned(), description, parameters });
        }
        let choice = match choice {
            None => Choice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Choice::Auto,
                "none" => return Ok(None),
                "required" => Choice::Required,
                other => {
                    return Err(bad(
                        format!("tool_choice {other:?} is not one of none, auto, required or a function"),
                        "tool_choice",
                    ));
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("tool_choice names a function as {\"type\": \"function\", \"function\": {\"name\"}}", "tool_choice"))?;
                if !parsed.iter().any(|t| t.name == name) {
                    return Err(bad(
                        format!("tool_choice names {name:?}, which is not among the tools"),
                        "tool_choice",
                    ));
                }
                Choice::Named(name.to_owned())
            }
        };
        if parsed.is_empty() {
            return match choice {
                Choice::Auto => Ok(None),
                _ => Err(bad("tool_choice needs tools", "tool_choice")),
            };
        }
        Ok(Some(Self { tools: parsed, choice, parallel: parallel.unwrap_or(true) }))
    }

    /// The tools as OpenAI lists them (what templates' `tools` variable takes).
    pub(crate) fn openai_tools(&self) -> Value {
        self.tools
            .iter()
            .map(|t| {
                let mut f = Map::new();
                f.insert("name".into(), json!(t.name));
                if let Some(d) = &t.description {
                    f.insert("description".into(), json!(d));
                }
                f.insert("parameters".into(), t.parameters.clone());
                json!({"type": "function", "function": f})
            })
            .collect()
    }

    /// Whether the output must be calls (`required` or a named function).
    pub(crate) fn constrained(&self) -> bool {
        self.choice != Choice::Auto
    }

    /// The fallback's system text: the tools and how to call them.
    pub(crate) fn fallback_prompt(&self) -> String {
        let mut s = String::from(
            "You may call functions to answer. To call one, reply with only a block like\n<tool_call>\n{\"name\": \"FUNCTION\", \"arguments\": {ARGUMENTS}}\n</tool_call>\n(one block per call). The functions, with their arguments as JSON schemas:\n",
        );
        for t in self.openai_tools().as_array().into_iter().flatten() {
            s.push_str(&t["function"].to_string());
            s.push('\n');
        }
        s
    }

    /// The Lark grammar (llguidance's dialect) of calls to the allowed functions in `syntax`.
    pub(crate) fn grammar(&self, syntax: Syntax) -> String {
        let allowed: Vec<&Tool> = match &self.choice {
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
            _ => self.tools.iter().collect(),
        };
        let key = if syntax == Syntax::Llama3 { "parameters" } else { "arguments" };
        let one = |t: &Tool| {
            let mut parameters = t.parameters.clone();
            close_objects(&mut parameters);
            json!({"type": "object", "properties": {"name": {"const": t.name}, key: parameters},
                   "required": ["name", key], "additionalProperties": false})
        };
        let mut schema = if allowed.len() == 1 {
            one(allowed[0])
        } else {
            json!({"anyOf": allowed.iter().map(|t| one(t)).collect::<Vec<_>>()})
        };
        if let Some(o) = schema.as_object_mut() {
            o.insert(
                "x-guidance".into(),
                json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
            );
        }
        let call = format!("%json {schema}");
        match (syntax, self.parallel) {
            (Syntax::Hermes, true) => {
                format!(
                    "start: call (\"\\n\" call)*\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: {call}\n"
                )
            }
            (Syntax::Hermes, false) => {
                format!("start: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: {call}\n")
            }
            (Syntax::Mistral, true) => format!("start: \"[\" body (\", \" body)* \"]\"\nbody: {call}\n"),
            (Syntax::Mistral, false) => format!("start: \"[\" body \"]\"\nbody: {call}\n"),
            (Syntax::Llama3, _) => format!("start: body\nbody: {call}\n"),
        }
    }
}

/// Makes every object schema in `schema` that lists `properties` and says nothing of
/// `additionalProperties` closed to other keys, as OpenAI's strict function calling does:
/// forced arguments then hold the declared parameters only (a small model otherwise pads
/// them with keys of its own invention, which a schema without the keyword allows).
fn close_objects(schema: &mut Value) {
    let Some(o) = schema.as_object_mut() else { return };
    if o.get("properties").is_some_and(Value::is_object) && !o.contains_key("additionalProperties") {
        o.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["properties", "$defs", "definitions"] {
        if let Some(Value::Object(children)) = o.get_mut(key) {
            children.values_mut().for_each(close_objects);
        }
    }
    for key in ["items", "additionalItems"] {
        if let Some(child) = o.get_mut(key) {
            close_objects(child);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(children)) = o.get_mut(key) {
            children.iter_mut().for_each(close_objects);
        }
    }
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Call {
    pub(crate) name: String,
    /// The arguments as a JSON text (OpenAI's form).
    pub(crate) arguments: String,
}

/// The calls of `v`, an object `{"name", "arguments"|"parameters"}` or a list of them.
fn calls_of(v: &Value) -> Option<Vec<Call>> {
    match v {
        Value::Array(items) if !items.is_empty() => {
            items.iter().map(|i| calls_of(i).and_then(|mut c| c.pop())).collect()
        }
        Value::Object(o) => {
            let name = o.get("name")?.as_str()?.to_owned();
            let args = o.get("arguments").or_else(|| o.get("parameters"))?;
            let arguments = match args {
                Value::String(s) => {
                    serde_json::from_str::<Value>(s).ok()?;
                    s.clone()
                }
                Value::Object(_) => args.to_string(),
                _ => return None,
            };
            Some(vec![Call { name, arguments }])
        }
        _ => None,
    }
}

/// The content and calls of a model's whole answer (`content` is the text outside calls).
pub(crate) fn parse(text: &str, syntax: Syntax) -> (String, Vec<Call>) {
    let none = || (text.to_owned(), Vec::new());
    match syntax {
        Syntax::Hermes => {
            let (mut content, mut calls, mut rest) = (String::new(), Vec::new(), text);
            while let Some(start) = rest.find("<tool_call>") {
                content.push_str(&rest[..start]);
                let body = &rest[start + "<tool_call>".len()..];
                let (inner, after, closed) = match body.find("</tool_call>") {
                    Some(end) => (&body[..end], &body[end + "</tool_call>".len()..], true),
                    None => (body, "", false),
                };
                let Some(mut c) =
                    serde_json::from_str::<Value>(inner.trim()).ok().as_ref().and_then(calls_of)
                else {
                    if closed || calls.is_empty() {
                        return none();
                    }
                    // The last call, cut short (max_tokens): the complete ones stand.
                    rest = "";
                    break;
                };
                calls.append(&mut c);
                rest = after;
            }
            content.push_str(rest);
            // A call cut short before its marker was complete is not content.
            let marker = "<tool_call>";
            if let Some(k) = (1..marker.len()).rev().find(|&k| content.ends_with(&marker[..k])) {
                content.truncate(content.len() - k);
            }
            (content.trim().to_owned(), calls)
        }
        Syntax::Mistral | Syntax::Llama3 => {
            let t = text.trim();
            let t = t.strip_prefix("[TOOL_CALLS]").or_else(|| t.strip_prefix("<|python_tag|>")).unwrap_or(t);
            match serde_json::from_str::<Value>(t.trim()).ok().as_ref().and_then(calls_of) {
                Some(calls) => (String::new(), calls),
                None => none(),
            }
        }
    }
}

/// Streams a choice's text while holding back what may be a call.
pub(crate) struct ToolStream {
    syntax: Syntax,
    /// The output is calls only (a grammar forces them).
    constrained: bool,
    /// Everything received.
    text: String,
    /// Bytes of `text` already sent as content.
    sent: usize,
    /// A call has begun: nothing more is sent as content until the end.
    in_call: bool,
}

impl ToolStream {
    pub(crate) fn new(syntax: Syntax, constrained: bool) -> Self {
        Self { syntax, constrained, text: String::new(), sent: 0, in_call: constrained }
    }

    /// Takes the next piece of text; returns the content that can be sent now.
    pub(crate) fn push(&mut self, piece: &str) -> String {
        self.text.push_str(piece);
        if self.in_call {
            return String::new();
        }
        let unsent = &self.text[self.sent..];
        let at_start = self.text[..self.sent].trim().is_empty();
        let lead = unsent.len() - unsent.trim_start().len();
        // Where a call begins, or where a held-back suffix might begin one.
        let mut hold = unsent.len();
        for m in self.syntax.markers() {
            let starts_only = self.syntax != Syntax::Hermes;
            if starts_only && !at_start {
                continue;
            }
            let hay = if starts_only { &unsent[lead..] } else { unsent };
            let base = if starts_only { lead } else { 0 };
            if let Some(i) = hay.find(m).filter(|&i| !starts_only || i == 0) {
                hold = hold.min(base + i);
                self.in_call = true;
                continue;
            }
            if starts_only {
                if m.starts_with(hay) {
                    hold = hold.min(base);
                }
            } else {
                // The longest suffix of the text that is a prefix of the marker.
                for k in (1..m.len().min(hay.len() + 1)).rev() {
                    if hay.is_char_boundary(hay.len() - k) && m.starts_with(&hay[hay.len() - k..]) {
                        hold = hold.min(hay.len() - k);
                        break;
                    }
                }
            }
        }
        let out = unsent[..hold].to_owned();
        self.sent += hold;
        out
    }

    /// The end of the text: the content not sent yet and the calls (none when the held text
    /// does not parse as calls; it is then content).
    pub(crate) fn finish(self) -> (String, Vec<Call>) {
        let (_, calls) = parse(&self.text, self.syntax);
        if self.constrained {
            return (String::new(), calls);
        }
        if calls.is_empty() {
            return (self.text[self.sent..].to_owned(), calls);
        }
        // What was held back but is not part of a call (rare: text between calls).
        let (content, _) = parse(&self.text[self.sent..], self.syntax);
        (content, calls)
    }
}

/// A fresh call id, as OpenAI writes them.
pub(crate) fn call_id() -> String {
    format!("call_{:024x}", rand::random::<u128>() >> 32)
}

/// An assistant message's `tool_calls` from OpenAI's shape to the template's (arguments as
/// objects); `None` when they are malformed.
pub(crate) fn template_calls(calls: &Value) -> Result<Value, ApiError> {
    let items = calls.as_array().ok_or_else(|| bad("tool_calls must be a list", "messages"))?;
    let mut out = Vec::with_capacity(items.len());
    for c in items {
        let f = c.get("function").ok_or_else(|| bad("a tool call needs a `function`", "messages"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("a tool call needs a name", "messages"))?;
        let arguments = match f.get("arguments") {
            Some(Value::String(s)) => serde_json::from_str::<Value>(s).map_err(|e| {
                bad(format!("the arguments of a call to {name:?} are not JSON: {e}"), "messages")
            })?,
            Some(v @ Value::Object(_)) => v.clone(),
            _ => return Err(bad(format!("a call to {name:?} needs arguments"), "messages")),
        };
        let mut call = json!({"type": "function", "function": {"name": name, "arguments": arguments}});
        if let Some(id) = c.get("id") {
            call["id"] = id.clone();
        }
        out.push(call);
    }
    Ok(Value::Array(out))
}

/// The fallback's text of earlier calls.
pub(crate) fn fallback_calls_text(calls: &Value) -> String {
    let mut s = String::new();
    for c in calls.as_array().into_iter().flatten() {
        let f = &c["function"];
        s.push_str(&format!(
            "<tool_call>\n{}\n</tool_call>",
            json!({"name": f["name"], "arguments": f["arguments"]})
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_read_in_each_syntax() {
        let (content, calls) = parse(
            "Let me look.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>{\"name\": \"g\", \"arguments\": \"{}\"}</tool_call>",
            Syntax::Hermes,
        );
        assert_eq!(content, "Let me look.");
        assert_eq!(
            calls,
            [
                Call { name: "f".into(), arguments: "{\"a\":1}".into() },
                Call { name: "g".into(), arguments: "{}".into() }
            ]
        );
        let (_, calls) = parse("[{\"name\": \"f\", \"arguments\": {}}]", Syntax::Mistral);
        assert_eq!(calls.len(), 1);
        let (_, calls) = parse("{\"name\": \"f\", \"parameters\": {\"x\": \"y\"}}", Syntax::Llama3);
        assert_eq!(calls, [Call { name: "f".into(), arguments: "{\"x\":\"y\"}".into() }]);
        // Not calls: the text stays content.
        assert_eq!(
            parse("<tool_call>nope</tool_call>", Syntax::Hermes),
            ("<tool_call>nope</tool_call>".into(), vec![])
        );
        assert_eq!(parse("{\"a\": 1}", Syntax::Llama3).1, vec![]);
        // A last call cut short by max_tokens is dropped, the complete ones stand.
        let (content, calls) = parse(
            "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\n<tool_call>\n{\"name\": \"f\", \"arg",
            Syntax::Hermes,
        );
        assert_eq!((content.as_str(), calls.len()), ("", 1));
    }

    #[test]
    fn streaming_holds_back_what_may_open_a_call() {
        let mut s = ToolStream::new(Syntax::Hermes, false);
        let mut sent = String::new();
        for piece in ["Hello", " <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"] {
            sent.push_str(&s.push(piece));
        }
        assert_eq!(sent, "Hello ");
        let (rest, calls) = s.finish();
        assert_eq!((rest.as_str(), calls.len()), ("", 1));

        // A `<` that does not open a call is sent once it is clear.
        let mut s = ToolStream::new(Syntax::Hermes, false);
        assert_eq!(s.push("a <"), "a ");
        assert_eq!(s.push("b"), "<b");
        assert_eq!(s.finish(), (String::new(), vec![]));

        // Llama 3: only an answer that starts with `{` may be a call.
        let mut s = ToolStream::new(Syntax::Llama3, false);
        assert_eq!(s.push("x {"), "x {");
        let mut s = ToolStream::new(Syntax::Llama3, false);
        assert_eq!(s.push(" {\"name\""), " ");
        assert_eq!(s.finish(), ("{\"name\"".into(), vec![]));
    }

    #[test]
    fn a_template_with_a_tools_section_renders_tools_calls_and_results() {
        use shoal_model_shards::chat_template::{ChatMessage, ChatTemplate};
        let src = include_str!("../../tests/fixtures/templates/qwen2.5_tools.jinja");
        let template = ChatTemplate::new(src, None, None).unwrap();
        assert!(template.takes_tools());
        assert_eq!(Syntax::of_template(src, true), Syntax::Hermes);
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}),
        ];
        let request = ToolRequest::parse(Some(&tools), None, None).unwrap().unwrap();
        let calls = template_calls(&json!([{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]))
        .unwrap();
        let mut assistant = ChatMessage::new("assistant", "");
        assistant.tool_calls = Some(calls);
        let mut result = ChatMessage::new("tool", "18 degrees");
        result.tool_call_id = Some("call_1".into());
        let messages = [ChatMessage::new("user", "Weather in Paris?"), assistant, result];
        let text = template.render_with_tools(&messages, true, Some(&request.openai_tools())).unwrap();
        // The template's `tojson` writes as Python's json.dumps does (sorted keys, spaces).
        let tool = "{\"function\": {\"name\": \"get_weather\", \"parameters\": {\"type\": \"object\"}}, \"type\": \"function\"}";
        assert!(text.contains(&format!("<tools>\n{tool}\n</tools>")), "{text}");
        assert!(
            text.contains("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"),
            "{text}"
        );
        assert!(
            text.contains("<|im_start|>user\n<tool_response>\n18 degrees\n</tool_response><|im_end|>"),
            "{text}"
        );
        assert!(text.ends_with("<|im_start|>assistant\n"));
    }

    #[test]
    fn tool_requests_are_validated() {
        let tools = vec![
            json!({"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}),
        ];
        let r = ToolRequest::parse(Some(&tools), None, None).unwrap().unwrap();
        assert_eq!(r.choice, Choice::Auto);
        assert!(ToolRequest::parse(Some(&tools), Some(&json!("none")), None).unwrap().is_none());
        let named = json!({"type": "function", "function": {"name": "nope"}});
        assert!(ToolRequest::parse(Some(&tools), Some(&named), None).is_err());
        let bad_name = vec![json!({"type": "function", "function": {"name": "a b"}})];
        assert!(ToolRequest::parse(Some(&bad_name), None, None).is_err());
        assert!(ToolRequest::parse(None, Some(&json!("required")), None).is_err());
        let g = r.grammar(Syntax::Hermes);
        assert!(g.contains("%json") && g.contains("get_weather"), "{g}");
        assert!(g.contains("\"additionalProperties\":false"), "parameters are closed: {g}");
    }
}
