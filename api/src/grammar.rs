//! Structured outputs: the grammars a request can constrain its output with, compiled by
//! llguidance (the engine llama.cpp, vLLM and SGLang use) against the model's vocabulary.
//!
//! A request names at most one of:
//! * `response_format`: `{"type": "json_object"}` (any JSON object) or
//!   `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}` (OpenAI's);
//! * vLLM's fields `guided_json` (a schema), `guided_regex`, `guided_choice` (a list of
//!   strings) and `guided_grammar` (a grammar in llguidance's Lark dialect).
//!
//! The grammar is compiled when the request is validated: a schema feature llguidance does
//! not implement, an unsatisfiable schema or a malformed grammar is a 400 that names it.
//! Each choice then runs its own [`Matcher`]: the driver asks it for the ids the next token
//! may take before each step and sends them to the last stage, which masks the logits before
//! sampling ([`shoal_coordinator_free_router::constraint`]). JSON is generated compactly
//! (`{"a": 1, "b": [2, 3]}`, no free whitespace), so a small model cannot wander into
//! endless blanks.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{Value, json};
use shoal_coordinator_free_router::constraint::TokenConstraint;
use shoal_model_shards::token_mask::TokenMask;
use shoal_model_shards::tokenizer::Tokenizer;

use crate::ApiError;
use crate::tokens::TokenText;

/// Longest grammar text a request may send (a schema, a regex or a Lark grammar), in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// The model's vocabulary as llguidance sees it: each id's bytes, special tokens marked.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        // Grammar literals are text; invalid UTF-8 falls back to the trie's greedy split.
        match std::str::from_utf8(s) {
            Ok(text) => self.tokenizer.encode(text, false).unwrap_or_else(|_| self.trie.greedy_tokenize(s)),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// Compiles grammars for one model (built on first use: the vocabulary's trie and token
/// classes take a fraction of a second).
pub(crate) struct Grammars {
    tokenizer: Tokenizer,
    vocab: usize,
    stop_ids: Vec<u32>,
    factory: OnceLock<Result<ParserFactory, String>>,
}

impl Grammars {
    /// For a model whose logits cover `vocab` ids and whose generation ends at `stop_ids`.
    pub(crate) fn new(tokenizer: &Tokenizer, vocab: usize, stop_ids: &[u32]) -> Self {
        Self { tokenizer: tokenizer.clone(), vocab, stop_ids: stop_ids.to_vec(), factory: OnceLock::new() }
    }

    fn factory(&self) -> Result<&ParserFactory, ApiError> {
        self.factory.get_or_init(|| self.build().map_err(|e| e.to_string())).as_ref().map_err(|e| {
            ApiError::internal(format!("structured outputs are unavailable for this model: {e}"))
        })
    }

    fn build(&self) -> anyhow::Result<ParserFactory> {
        let text = TokenText::new(&self.tokenizer);
        let inner = self.tokenizer.inner();
        let special: HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let words: Vec<Vec<u8>> = (0..self.vocab as u32)
            .map(|id| {
                if special.contains(&id) || self.stop_ids.contains(&id) {
                    let name = inner.id_to_token(id).unwrap_or_default();
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend_from_slice(name.as_bytes());
                    w
                } else {
                    text.bytes(id)
                }
            })
            .collect();
        let eos = self.stop_ids.first().copied().unwrap_or(0);
        let info = TokRxInfo::new(self.vocab as u32, eos);
        let mut trie = TokTrie::from(&info, &words);
        if !self.stop_ids.is_empty() {
            trie = trie.with_eos_tokens(&self.stop_ids);
        }
        let env: TokEnv = Arc::new(Vocabulary { trie, tokenizer: self.tokenizer.clone() });
        let mut factory = ParserFactory::new_simple(&env)?;
        factory.quiet();
        Ok(factory)
    }

    /// Compiles `spec` (a 400 naming `param` when it cannot be).
    pub(crate) fn compile(&self, spec: &Spec) -> Result<Grammar, ApiError> {
        let (grammar, param) = spec.grammar()?;
        let factory = self.factory()?;
        // llguidance turns its own panics into errors the way its matcher does.
        let parser = llguidance::panic_utils::catch_unwind(std::panic::AssertUnwindSafe(|| {
            factory.create_parser(grammar)
        }))
        .map_err(|e| ApiError::invalid(format!("{param} cannot be used: {e}"), Some(param)))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(ApiError::invalid(format!("{param} cannot be used: {e}"), Some(param)));
        }
        Ok(Grammar { matcher: Arc::new(matcher), vocab: self.vocab })
    }
}

/// What a request asked its output to follow.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Spec {
    /// A JSON schema (`json_object` is `{"type": "object"}`).
    Json { schema: Value, param: &'static str },
    /// A regular expression the whole output matches.
    Regex(String),
    /// One of these strings.
    Choice(Vec<String>),
    /// A grammar in llguidance's Lark dialect.
    Lark { grammar: String, param: &'static str },
}

impl Spec {
    /// The llguidance grammar and the request field it came from.
    fn grammar(&self) -> Result<(TopLevelGrammar, &'static str), ApiError> {
        Ok(match self {
            Self::Json { schema, param } => {
                let mut schema = schema.clone();
                let Some(obj) = schema.as_object_mut() else {
                    return Err(ApiError::invalid("a JSON schema must be an object", Some(param)));
                };
                if obj.contains_key("x-guidance") {
                    return Err(ApiError::invalid("x-guidance is not accepted in a schema", Some(param)));
                }
                obj.insert(
                    "x-guidance".into(),
                    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
                );
                (TopLevelGrammar::from_json_schema(schema), param)
            }
            Self::Regex(rx) => (TopLevelGrammar::from_regex(rx), "guided_regex"),
            Self::Choice(choices) => {
                let alts: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                (TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | "))), "guided_choice")
            }
            Self::Lark { grammar, param } => (TopLevelGrammar::from_lark(grammar.clone()), param),
        })
    }

    /// The spec of a request's `response_format` and vLLM `guided_*` fields (`None`: free
    /// text). At most one may be given.
    pub(crate) fn of_request(fields: &GuidedFields) -> Result<Option<Self>, ApiError> {
        let mut specs = Vec::new();
        if let Some(f) = &fields.response_format {
            let kind = f.get("type").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid("response_format needs a `type`", Some("response_format"))
            })?;
            match kind {
                "text" => {}
                "json_object" => {
                    specs.push(Self::Json { schema: json!({"type": "object"}), param: "response_format" })
                }
                "json_schema" => {
                    let schema = f
                        .get("json_schema")
                        .and_then(|j| j.get("schema"))
                        .cloned()
                        // OpenAI's SDK sends the schema; a missing one means any JSON value.
                        .unwrap_or_else(|| json!({}));
                    specs.push(Self::Json { schema, param: "response_format" });
                }
                other => {
                    return Err(ApiError::invalid(
                        format!(
                            "response_format type `{other}` is not supported (text, json_object, json_schema)"
                        ),
                        Some("response_format"),
                    ));
                }
            }
        }
        if let Some(s) = &fields.guided_json {
            let schema = match s {
                Value::String(text) => serde_json::from_str(text).map_err(|e| {
                    ApiError::invalid(format!("guided_json is not JSON: {e}"), Some("guided_json"))
                })?,
                other => other.clone(),
            };
            specs.push(Self::Json { schema, param: "guided_json" });
        }
        if let Some(rx) = &fields.guided_regex {
            specs.push(Self::Regex(rx.clone()));
        }
        if let Some(choices) = &fields.guided_choice {
            if choices.is_empty() {
                return Err(ApiError::invalid("guided_choice must not be empty", Some("guided_choice")));
            }
            specs.push(Self::Choice(choices.clone()));
        }
        if let Some(g) = &fields.guided_grammar {
            specs.push(Self::Lark { grammar: g.clone(), param: "guided_grammar" });
        }
        if specs.len() > 1 {
            return Err(ApiError::invalid(
                "give at most one of response_format (json), guided_json, guided_regex, guided_choice and guided_grammar",
                Some("response_format"),
            ));
        }
        let spec = specs.pop();
        if let Some(s) = &spec {
            let size = match s {
                Self::Json { schema, .. } => schema.to_string().len(),
                Self::Regex(r) => r.len(),
                Self::Choice(c) => c.iter().map(String::len).sum(),
                Self::Lark { grammar, .. } => grammar.len(),
            };
            if size > MAX_GRAMMAR_BYTES {
                return Err(ApiError::invalid(
                    format!("the grammar has {size} bytes; at most {MAX_GRAMMAR_BYTES} are accepted"),
                    Some("response_format"),
                ));
            }
        }
        Ok(spec)
    }
}

/// `s` as a Lark string literal.
pub(crate) fn lark_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// The request fields that ask for structured output.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub(crate) struct GuidedFields {
    pub(crate) response_format: Option<Value>,
    pub(crate) guided_json: Option<Value>,
    pub(crate) guided_regex: Option<String>,
    pub(crate) guided_choice: Option<Vec<String>>,
    pub(crate) guided_grammar: Option<String>,
}

/// A compiled grammar, ready to start a choice.
#[derive(Clone)]
pub(crate) struct Grammar {
    matcher: Arc<Matcher>,
    vocab: usize,
}

impl fmt::Debug for Grammar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Grammar")
    }
}

impl Grammar {
    /// A fresh matcher for one choice; each mask's computing time goes to `timer`.
    pub(crate) fn start(&self, timer: prometheus::Histogram) -> GrammarState {
        GrammarState { matcher: self.matcher.deep_clone(), vocab: self.vocab, timer }
    }
}

/// One choice's position in its grammar.
pub(crate) struct GrammarState {
    matcher: Matcher,
    vocab: usize,
    timer: prometheus::Histogram,
}

impl TokenConstraint for GrammarState {
    fn next_mask(&mut self) -> Result<Option<TokenMask>, String> {
        if self.matcher.is_stopped() {
            return match self.matcher.get_error() {
                Some(e) => Err(e),
                None => Ok(None),
            };
        }
        let started = std::time::Instant::now();
        let mask = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        let mask = TokenMask::from_bits(Vec::from(mask), self.vocab);
        self.timer.observe(started.elapsed().as_secs_f64());
        Ok(if mask.validate(self.vocab).is_ok() { Some(mask) } else { None })
    }

    fn advance(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}
