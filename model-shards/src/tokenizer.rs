//! Text ⇄ token-id conversion for shoal's engine.
//!
//! [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] pipeline that is either loaded from a
//! Hugging Face `tokenizer.json` ([`Tokenizer::from_file`], [`Tokenizer::from_hf_dir`]) or
//! rebuilt from GGUF metadata ([`Tokenizer::from_gguf`]) so that it yields the same ids as
//! llama.cpp's `llama_tokenize(…, add_special = false, parse_special = true)`:
//!
//! * `tokenizer.ggml.model = "gpt2"` (byte-level BPE): the `tokenizer.ggml.pre` regex family
//!   is mapped to the split regexes llama.cpp's `llama-vocab.cpp` uses (see
//!   [`PRE_TOKENIZER_TYPES`]), each applied as an isolating split, followed by a byte-level
//!   mapping *without* a prefix space, BPE over `tokenizer.ggml.merges`, and a byte-level
//!   decoder. candle's own `candle_core::quantized::tokenizer` is deliberately not used: it
//!   adds a prefix space and gets ids wrong (SmolLM2: `"The"` → 378 instead of 504).
//! * `tokenizer.ggml.model = "llama"` (SentencePiece-style BPE): spaces become `▁` (with a
//!   prefix `▁` unless `tokenizer.ggml.add_space_prefix` is false), merges are derived from
//!   `tokenizer.ggml.scores` (the higher the score of the merged piece, the earlier the
//!   merge), unknown characters fall back to `<0xNN>` byte tokens.
//!
//! Tokens of `tokenizer.ggml.token_type` 3 (control) become added *special* tokens and tokens
//! of type 4 (user-defined) added non-special tokens; both are matched verbatim in the input,
//! so `<|im_start|>` written in a prompt is a single id, as with llama.cpp's `special = true`.
//!
//! [`IncrementalDecoder`] turns a stream of generated ids into text chunks that never split a
//! UTF-8 character (the prefix-offset/read-offset scheme of text-generation-inference).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{
    AddedToken, DecoderWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer as HfTokenizer,
};

/// Errors raised while loading a tokenizer or converting between text and ids.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that could not be read.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A Hugging Face `tokenizer.json` could not be parsed.
    #[error("cannot load tokenizer from {path}: {message}")]
    Load {
        /// The `tokenizer.json` file.
        path: PathBuf,
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// A `tokenizer_config.json` is not valid JSON or has unexpected field types.
    #[error("invalid tokenizer config {path}: {message}")]
    Config {
        /// The `tokenizer_config.json` file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A required GGUF metadata key is absent.
    #[error("GGUF metadata key `{key}` is missing")]
    MissingMetadata {
        /// The missing key, e.g. `tokenizer.ggml.tokens`.
        key: &'static str,
    },
    /// A GGUF metadata key has an unexpected type or an inconsistent value.
    #[error("GGUF metadata key `{key}` is invalid: {message}")]
    InvalidMetadata {
        /// The offending key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },
    /// `tokenizer.ggml.model` names a tokenizer family this module cannot rebuild.
    #[error("unsupported GGUF tokenizer model `{0}` (supported: gpt2, llama)")]
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer type this module does not know.
    #[error("unknown pre-tokenizer type `{0}` in GGUF metadata `tokenizer.ggml.pre`")]
    UnknownPreTokenizer(String),
    /// The `tokenizers` pipeline could not be assembled (bad regex, merge out of vocab, …).
    #[error("cannot build the tokenizer pipeline ({stage}): {message}")]
    Build {
        /// The pipeline stage that failed.
        stage: &'static str,
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// Encoding text failed.
    #[error("cannot encode text: {message}")]
    Encode {
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// Decoding ids failed.
    #[error("cannot decode ids: {message}")]
    Decode {
        /// What the `tokenizers` crate reported.
        message: String,
    },
    /// An id outside the vocabulary was passed to a decoding function.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    UnknownId {
        /// The offending id.
        id: u32,
        /// The vocabulary size (including added tokens).
        vocab_size: usize,
    },
}

/// Result alias of this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// One llama.cpp pre-tokenizer family: the `tokenizer.ggml.pre` names that select it, the
/// regexes applied in order (every regex splits each fragment into matches and non-matches,
/// both kept), and whether a pre-token found whole in the vocabulary skips the merges.
#[derive(Debug, Clone, Copy)]
pub struct PreTokenizerType {
    /// `tokenizer.ggml.pre` values mapped to this family.
    pub names: &'static [&'static str],
    /// Split regexes, as in llama.cpp's `llm_tokenizer_bpe` constructor.
    pub regexes: &'static [&'static str],
    /// llama.cpp's `ignore_merges` (a whole pre-token present in the vocabulary is one id).
    pub ignore_merges: bool,
    /// llama.cpp's default for `add_bos` when `tokenizer.ggml.add_bos_token` is absent.
    pub add_bos_default: bool,
}

const RE_GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
const RE_LLAMA3: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN2: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_QWEN35: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BLOOM: &str = r" ?[^(\s|.,!?\x{2026}\x{3002}\x{FF0C}\x{3001}\x{964}\x{6D4}\x{60C})]+";
const RE_SEED_CODER: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+";
const RE_BAILINGMOE: &str = r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
const RE_DEEPSEEK3: &str = r"[!\x22#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The llama.cpp pre-tokenizer types this module maps (`tokenizer.ggml.pre`). A missing key
/// selects `"default"`, like llama.cpp; any other name is [`TokenizerError::UnknownPreTokenizer`].
pub const PRE_TOKENIZER_TYPES: &[PreTokenizerType] = &[
    PreTokenizerType {
        names: &["default"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|]+", RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"],
        regexes: &[RE_LLAMA3],
        ignore_merges: true,
        add_bos_default: true,
    },
    PreTokenizerType {
        names: &["dbrx", "smaug-bpe"],
        regexes: &[RE_LLAMA3],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["chatglm-bpe"],
        regexes: &[RE_LLAMA3],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType { names: &["glm4"], regexes: &[RE_LLAMA3], ignore_merges: true, add_bos_default: false },
    PreTokenizerType {
        names: &["deepseek-llm"],
        regexes: &[
            r"[\r\n]",
            r"\s?[A-Za-z\x{B5}\x{C0}-\x{D6}\x{D8}-\x{F6}\x{F8}-\x{1BA}\x{1BC}-\x{1BF}\x{1C4}-\x{293}\x{295}-\x{2AF}\x{370}-\x{373}\x{376}\x{377}\x{37B}-\x{37D}\x{37F}\x{386}\x{388}-\x{38A}\x{38C}\x{38E}-\x{3A1}\x{3A3}-\x{3F5}\x{3F7}-\x{481}\x{48A}-\x{52F}\x{531}-\x{556}\x{10A0}-\x{10C5}\x{13A0}-\x{13F5}\x{13F8}-\x{13FD}\x{1C90}-\x{1CBA}\x{1CBD}-\x{1CBF}\x{1D00}-\x{1D2B}\x{1D6B}-\x{1D77}\x{1D79}-\x{1D9A}\x{1E00}-\x{1F15}\x{1F18}-\x{1F1D}\x{1F20}-\x{1F45}\x{1F48}-\x{1F4D}\x{1F50}-\x{1F57}\x{1F59}\x{1F5B}\x{1F5D}\x{1F5F}-\x{1F7D}\x{1F80}-\x{1FB4}\x{1FB6}-\x{1FBC}\x{1FBE}\x{1FC2}-\x{1FC4}\x{1FC6}-\x{1FCC}\x{1FD0}-\x{1FD3}\x{1FD6}-\x{1FDB}\x{1FE0}-\x{1FEC}\x{1FF2}-\x{1FF4}\x{1FF6}-\x{1FFC}\x{2102}\x{2107}\x{210A}-\x{2113}\x{2115}\x{2119}-\x{211D}\x{2124}\x{2126}\x{2128}\x{212A}-\x{212D}\x{212F}-\x{2134}\x{2139}\x{213C}-\x{213F}\x{2145}-\x{2149}\x{214E}\x{2183}\x{2184}\x{2C00}-\x{2C7B}\x{2C7E}-\x{2CE4}\x{2CEB}-\x{2CEE}\x{2CF2}\x{2CF3}\x{A640}-\x{A66D}\x{A680}-\x{A69B}\x{A722}-\x{A76F}\x{A771}-\x{A787}\x{A78B}-\x{A78E}\x{AB70}-\x{ABBF}\x{FB00}-\x{FB06}\x{FB13}-\x{FB17}\x{FF21}-\x{FF3A}\x{FF41}-\x{FF5A}\x{10400}-\x{1044F}\x{104B0}-\x{104D3}\x{104D8}-\x{104FB}\x{10C80}-\x{10CB2}\x{10CC0}-\x{10CF2}\x{118A0}-\x{118DF}\x{1E900}-\x{1E943}]+",
            r"\s?[!-/:-~\x{FF01}-\x{FF0F}\x{FF1A}-\x{FF5E}\x{2018}-\x{201F}\x{3000}-\x{3002}]+",
            r"\s+$",
            r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
            r"\p{N}+",
        ],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["deepseek-coder"],
        regexes: &[
            "[\r\n]",
            r"\s?\p{L}+",
            r"\s?\p{P}+",
            r"[\x{4E00}-\x{9FA5}\x{800}-\x{4E00}\x{AC00}-\x{D7FF}]+",
            r"\p{N}",
        ],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["deepseek-v3", "hunyuan-dense", "joyai-llm", "hy_v4"],
        regexes: &[r"\p{N}{1,3}", r"[\x{4E00}-\x{9FA5}\x{3040}-\x{309F}\x{30A0}-\x{30FF}]+", RE_DEEPSEEK3],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["falcon"],
        regexes: &[r"[\p{P}\$\+<=>\^~\|`]+", RE_GPT2, r"[0-9][0-9][0-9]"],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &[
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ],
        regexes: &[r"\p{N}", RE_GPT2],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &[
            "gpt-2",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "mpt",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ],
        regexes: &[RE_GPT2],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &[
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
        ],
        regexes: &[RE_QWEN2],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["qwen35"],
        regexes: &[RE_QWEN35],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["poro-chat", "bloom", "gpt3-finnish"],
        regexes: &[RE_BLOOM],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["viking"],
        regexes: &[RE_BLOOM, r"\p{N}"],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["tekken"],
        regexes: &[RE_TEKKEN],
        ignore_merges: true,
        add_bos_default: true,
    },
    PreTokenizerType {
        names: &["gpt-4o", "llama4", "kanana2", "minimax-m2"],
        regexes: &[RE_GPT4O],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["seed-coder"],
        regexes: &[RE_SEED_CODER],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["bailingmoe", "bailingmoe2", "llada-moe"],
        regexes: &[RE_BAILINGMOE],
        ignore_merges: false,
        add_bos_default: false,
    },
    PreTokenizerType {
        names: &["grok-2"],
        regexes: &[RE_QWEN2],
        ignore_merges: false,
        add_bos_default: false,
    },
];

/// Looks up the llama.cpp pre-tokenizer family for a `tokenizer.ggml.pre` value.
pub fn pre_tokenizer_type(name: &str) -> Option<&'static PreTokenizerType> {
    PRE_TOKENIZER_TYPES.iter().find(|t| t.names.contains(&name))
}

/// Token texts that end a generation turn. A token with one of these texts is added to
/// [`Tokenizer::eos_ids`] when it is in the vocabulary and the chat template mentions it
/// (or when there is no chat template at all, as llama.cpp's end-of-generation list does).
pub const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<end_of_turn>",
    "<end_of_utterance>",
    "<｜end▁of▁sentence｜>",
    "<EOT>",
    "</s>",
    "<eos>",
];

/// The fields of a Hugging Face `tokenizer_config.json` this module uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// `bos_token` (a string or an `{"content": …}` object).
    pub bos_token: Option<String>,
    /// `eos_token` (a string or an `{"content": …}` object).
    pub eos_token: Option<String>,
    /// `add_bos_token`, when present.
    pub add_bos_token: Option<bool>,
    /// `chat_template`: the string itself, or the `"default"` entry of a
    /// `[{"name": …, "template": …}]` list (the first entry if there is no `"default"`).
    pub chat_template: Option<String>,
}

impl TokenizerConfig {
    /// Reads and parses a `tokenizer_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TokenizerError::Config { path: path.to_path_buf(), message: e.to_string() })?;
        Self::from_json(&json).map_err(|message| TokenizerError::Config { path: path.to_path_buf(), message })
    }

    /// Reads `dir/tokenizer_config.json` when present (all fields `None` otherwise); a
    /// `dir/chat_template.jinja` file (newer Hugging Face repositories) supplies the chat
    /// template when the config has none.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let mut config = if config_path.is_file() { Self::from_file(&config_path)? } else { Self::default() };
        let jinja_path = dir.join("chat_template.jinja");
        if config.chat_template.is_none() && jinja_path.is_file() {
            let source = std::fs::read_to_string(&jinja_path)
                .map_err(|source| TokenizerError::Io { path: jinja_path.clone(), source })?;
            config.chat_template = Some(source);
        }
        Ok(config)
    }

    /// Extracts the fields from an already parsed `tokenizer_config.json`; the error is a
    /// description of the first malformed field.
    pub fn from_json(json: &serde_json::Value) -> std::result::Result<Self, String> {
        fn token(json: &serde_json::Value, key: &str) -> std::result::Result<Option<String>, String> {
            match json.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Object(o)) => match o.get("content") {
                    Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(format!("`{key}` object has no string `content`")),
                },
                Some(other) => Err(format!("`{key}` must be a string, got {other}")),
            }
        }
        let add_bos_token = match json.get("add_bos_token") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Bool(b)) => Some(*b),
            Some(other) => return Err(format!("`add_bos_token` must be a bool, got {other}")),
        };
        let chat_template = match json.get("chat_template") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => {
                let named = |want: Option<&str>| {
                    list.iter().find_map(|entry| {
                        let name = entry.get("name").and_then(serde_json::Value::as_str);
                        let template = entry.get("template").and_then(serde_json::Value::as_str)?;
                        (want.is_none() || name == want).then(|| template.to_owned())
                    })
                };
                named(Some("default")).or_else(|| named(None))
            }
            Some(other) => {
                return Err(format!("`chat_template` must be a string or a list, got {other}"));
            }
        };
        Ok(Self {
            bos_token: token(json, "bos_token")?,
            eos_token: token(json, "eos_token")?,
            add_bos_token,
            chat_template,
        })
    }
}

/// A tokenizer with the special-token facts an inference engine needs (BOS, the ids that end
/// generation, the chat template). Cloning is cheap (the pipeline is shared).
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: Arc<HfTokenizer>,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    eos_ids: Vec<u32>,
    /// Prepend BOS ourselves in `encode(…, true)` (GGUF); HF pipelines use their post-processor.
    prepend_bos: bool,
    add_bos: bool,
    bos_token: Option<String>,
    eos_token: Option<String>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`. If a `tokenizer_config.json` (and/or a
    /// `chat_template.jinja`) sits in the same directory it supplies the BOS/EOS tokens, `add_bos_token` and the chat template;
    /// otherwise BOS/EOS stay unknown unless set by the tokenizer's post-processor, and
    /// [`eos_ids`](Self::eos_ids) holds the [`END_OF_TURN_TOKENS`] present as added tokens.
    /// With a config, `encode(…, true)` adds whatever the `tokenizer.json` post-processor
    /// adds (this is how Hugging Face applies `add_bos_token`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = HfTokenizer::from_file(path)
            .map_err(|e| TokenizerError::Load { path: path.to_path_buf(), message: e.to_string() })?;
        let dir = path.parent().unwrap_or_else(|| Path::new("."));
        let config = TokenizerConfig::from_hf_dir(dir)?;
        Ok(Self::from_hf_parts(inner, config))
    }

    /// Loads `dir/tokenizer.json` (and `dir/tokenizer_config.json` when present); see
    /// [`from_file`](Self::from_file).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Wraps an already built `tokenizers` pipeline together with the fields of a
    /// `tokenizer_config.json` (use `TokenizerConfig::default()` when there is none).
    pub fn from_hf_parts(inner: HfTokenizer, config: TokenizerConfig) -> Self {
        let bos_id = config.bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let eos_id = config.eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let add_bos = match (bos_id, inner.encode_fast("", true)) {
            (Some(bos), Ok(enc)) => enc.get_ids().first() == Some(&bos),
            _ => false,
        };
        let lookup = |text: &str| inner.get_added_vocabulary().token_to_id(text, inner.get_model());
        let eos_ids = end_of_generation_ids(eos_id, &[], config.chat_template.as_deref(), lookup);
        Self {
            inner: Arc::new(inner),
            bos_id,
            eos_id,
            eos_ids,
            prepend_bos: false,
            add_bos,
            bos_token: config.bos_token,
            eos_token: config.eos_token,
            chat_template: config.chat_template,
        }
    }

    /// Rebuilds the tokenizer from GGUF metadata (`tokenizer.ggml.*`, see the module docs),
    /// including the BOS/EOS ids, `add_bos_token` and `tokenizer.chat_template`.
    pub fn from_gguf(content: &Content) -> Result<Self> {
        let md = &content.metadata;
        let model = meta_str(md, "tokenizer.ggml.model")?
            .ok_or(TokenizerError::MissingMetadata { key: "tokenizer.ggml.model" })?
            .to_owned();
        let tokens = meta_str_array(md, "tokenizer.ggml.tokens")?
            .ok_or(TokenizerError::MissingMetadata { key: "tokenizer.ggml.tokens" })?;
        let n_vocab = tokens.len();
        let token_types = match meta_int_array(md, "tokenizer.ggml.token_type")? {
            Some(types) if types.len() == n_vocab => types,
            Some(types) => {
                return Err(TokenizerError::InvalidMetadata {
                    key: "tokenizer.ggml.token_type",
                    message: format!("{} entries for {n_vocab} tokens", types.len()),
                });
            }
            None => vec![TOKEN_TYPE_NORMAL; n_vocab],
        };
        let token_id = |key: &'static str| -> Result<Option<u32>> {
            match meta_int(md, key)? {
                None => Ok(None),
                Some(id) if id >= 0 && (id as usize) < n_vocab => Ok(Some(id as u32)),
                // llama.cpp writes -1 / out-of-range ids for "none".
                Some(_) => Ok(None),
            }
        };
        let bos_id = token_id("tokenizer.ggml.bos_token_id")?;
        let eos_id = token_id("tokenizer.ggml.eos_token_id")?;
        let extra_eos: Vec<u32> =
            [token_id("tokenizer.ggml.eot_token_id")?, token_id("tokenizer.ggml.eom_token_id")?]
                .into_iter()
                .flatten()
                .collect();
        let explicit_add_bos = meta_bool(md, "tokenizer.ggml.add_bos_token")?;
        let chat_template = meta_str(md, "tokenizer.chat_template")?.map(str::to_owned);

        let (mut inner, add_bos_default) = match model.as_str() {
            "gpt2" => {
                let pre = meta_str(md, "tokenizer.ggml.pre")?.unwrap_or("default");
                let pre_type = pre_tokenizer_type(pre)
                    .ok_or_else(|| TokenizerError::UnknownPreTokenizer(pre.to_owned()))?;
                let merges = meta_str_array(md, "tokenizer.ggml.merges")?
                    .ok_or(TokenizerError::MissingMetadata { key: "tokenizer.ggml.merges" })?;
                (build_byte_level_bpe(&tokens, &merges, pre_type)?, pre_type.add_bos_default)
            }
            "llama" => {
                let scores = meta_float_array(md, "tokenizer.ggml.scores")?
                    .ok_or(TokenizerError::MissingMetadata { key: "tokenizer.ggml.scores" })?;
                if scores.len() != n_vocab {
                    return Err(TokenizerError::InvalidMetadata {
                        key: "tokenizer.ggml.scores",
                        message: format!("{} entries for {n_vocab} tokens", scores.len()),
                    });
                }
                let add_space_prefix = meta_bool(md, "tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
                let unk = token_id("tokenizer.ggml.unknown_token_id")?
                    .and_then(|id| tokens.get(id as usize).cloned());
                (build_sentencepiece_bpe(&tokens, &scores, &token_types, unk, add_space_prefix)?, true)
            }
            _ => return Err(TokenizerError::UnsupportedModel(model)),
        };

        let mut specials = Vec::new();
        let mut user_defined = Vec::new();
        for (text, kind) in tokens.iter().zip(&token_types) {
            match *kind {
                TOKEN_TYPE_CONTROL => {
                    specials.push(AddedToken::from(text.clone(), true).normalized(false).special(true))
                }
                TOKEN_TYPE_USER_DEFINED => {
                    user_defined.push(AddedToken::from(text.clone(), false).normalized(false).special(false))
                }
                _ => {}
            }
        }
        inner
            .add_special_tokens(specials)
            .map_err(|e| TokenizerError::Build { stage: "special tokens", message: e.to_string() })?;
        inner
            .add_tokens(user_defined)
            .map_err(|e| TokenizerError::Build { stage: "user-defined tokens", message: e.to_string() })?;

        let lookup = |text: &str| {
            tokens
                .iter()
                .position(|t| t == text)
                .filter(|&i| {
                    matches!(token_types.get(i), Some(&TOKEN_TYPE_CONTROL | &TOKEN_TYPE_USER_DEFINED))
                })
                .map(|i| i as u32)
        };
        let eos_ids = end_of_generation_ids(eos_id, &extra_eos, chat_template.as_deref(), lookup);
        let token_text = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize).cloned());
        Ok(Self {
            bos_token: token_text(bos_id),
            eos_token: token_text(eos_id),
            inner: Arc::new(inner),
            bos_id,
            eos_id,
            eos_ids,
            prepend_bos: true,
            add_bos: explicit_add_bos.unwrap_or(add_bos_default) && bos_id.is_some(),
            chat_template,
        })
    }

    /// Encodes `text`. Special-token texts (`<|im_start|>`, …) in `text` are always matched
    /// as single ids. With `add_special`, BOS is prepended when the model asks for it
    /// ([`add_bos`](Self::add_bos)); nothing else is added.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode_fast(text, add_special && !self.prepend_bos)
            .map_err(|e| TokenizerError::Encode { message: e.to_string() })?;
        let ids = enc.get_ids();
        match self.bos_id {
            Some(bos) if add_special && self.prepend_bos && self.add_bos => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes `ids` to text, special tokens included verbatim (like llama.cpp's
    /// `detokenize(…, special = true)`). Bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Decodes `ids`; with `skip_special`, control tokens (GGUF token type 3, or special
    /// added tokens of a `tokenizer.json`) are left out, like llama.cpp's `special = false`.
    pub fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        let vocab_size = self.vocab_size();
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::UnknownId { id, vocab_size });
        }
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::Decode { message: e.to_string() })
    }

    /// Starts an [`IncrementalDecoder`] that renders special tokens verbatim (as [`decode`](Self::decode)).
    pub fn incremental_decoder(&self) -> IncrementalDecoder {
        IncrementalDecoder::new(self.clone(), false)
    }

    /// The BOS id, when the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The EOS id declared by the model (`tokenizer.ggml.eos_token_id` / `eos_token`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Every id that ends generation, the declared EOS first. Rule: the EOS id, plus the
    /// GGUF `tokenizer.ggml.eot_token_id` / `eom_token_id`, plus every [`END_OF_TURN_TOKENS`]
    /// text that is a special (control or added) token of the vocabulary *and* appears in the
    /// chat template source; when there is no chat template, every such token present.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Whether `id` is one of [`eos_ids`](Self::eos_ids).
    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }

    /// Whether `encode(…, true)` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The BOS token text (for the chat template's `bos_token`).
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS token text (for the chat template's `eos_token`).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The chat template source shipped with the tokenizer, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token given in its vocabulary spelling (byte-level BPE spells a space `Ġ`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary spelling of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` pipeline.
    pub fn inner(&self) -> &HfTokenizer {
        &self.inner
    }
}

/// Streams generated ids into text chunks that never end inside a UTF-8 character.
///
/// Uses text-generation-inference's scheme: the tokens from `prefix_offset` to `read_offset`
/// were already emitted and are re-decoded as context, so decoders that look at neighbours
/// (byte fallback, SentencePiece's leading space) stay correct; new text is released only when
/// the decoded tail does not end in U+FFFD (an incomplete character). Concatenating every
/// [`push`](Self::push) output and the [`finish`](Self::finish) output equals
/// [`Tokenizer::decode`] of all ids whenever those ids decode to valid UTF-8.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    skip_special: bool,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// A decoder over `tokenizer` (cheap: the pipeline is shared); `skip_special` as in
    /// [`Tokenizer::decode_with`].
    pub fn new(tokenizer: Tokenizer, skip_special: bool) -> Self {
        Self { tokenizer, skip_special, ids: Vec::new(), prefix_offset: 0, read_offset: 0 }
    }

    /// Adds one id; returns the newly completed text, or `None` while a character is still
    /// incomplete (or the id renders as nothing).
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prefix = self.decode_range(self.prefix_offset, self.read_offset)?;
        let full = self.decode_range(self.prefix_offset, self.ids.len())?;
        if full.len() > prefix.len()
            && !full.ends_with(char::REPLACEMENT_CHARACTER)
            && let Some(new) = full.get(prefix.len()..)
        {
            let new = new.to_owned();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(Some(new));
        }
        Ok(None)
    }

    /// Flushes the text held back so far (incomplete bytes become U+FFFD) and resets the
    /// decoder for a new sequence.
    pub fn finish(&mut self) -> Result<String> {
        let prefix = self.decode_range(self.prefix_offset, self.read_offset)?;
        let full = self.decode_range(self.prefix_offset, self.ids.len())?;
        let rest = if full.len() > prefix.len() {
            match full.get(prefix.len()..) {
                Some(rest) => rest.to_owned(),
                None => {
                    String::from_utf8_lossy(full.as_bytes().get(prefix.len()..).unwrap_or(&[])).into_owned()
                }
            }
        } else {
            String::new()
        };
        self.ids.clear();
        self.prefix_offset = 0;
        self.read_offset = 0;
        Ok(rest)
    }

    /// All ids pushed since the start (or the last [`finish`](Self::finish)).
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    fn decode_range(&self, start: usize, end: usize) -> Result<String> {
        match self.ids.get(start..end) {
            Some(ids) if !ids.is_empty() => self.tokenizer.decode_with(ids, self.skip_special),
            _ => Ok(String::new()),
        }
    }
}

const TOKEN_TYPE_NORMAL: i64 = 1;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

fn end_of_generation_ids(
    eos_id: Option<u32>,
    extra: &[u32],
    chat_template: Option<&str>,
    lookup: impl Fn(&str) -> Option<u32>,
) -> Vec<u32> {
    let mut out: Vec<u32> = eos_id.into_iter().collect();
    let mut push = |id: u32| {
        if !out.contains(&id) {
            out.push(id);
        }
    };
    extra.iter().copied().for_each(&mut push);
    for text in END_OF_TURN_TOKENS {
        if chat_template.is_none_or(|t| t.contains(text))
            && let Some(id) = lookup(text)
        {
            push(id);
        }
    }
    out
}

fn build_error(stage: &'static str) -> impl Fn(tokenizers::Error) -> TokenizerError {
    move |e| TokenizerError::Build { stage, message: e.to_string() }
}

fn vocab_map(tokens: &[String]) -> Vocab {
    let mut vocab = Vocab::default();
    vocab.reserve(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        // First occurrence wins for duplicated spellings.
        vocab.entry(token.clone()).or_insert(id as u32);
    }
    vocab
}

fn build_byte_level_bpe(tokens: &[String], merges: &[String], pre: &PreTokenizerType) -> Result<HfTokenizer> {
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| {
                TokenizerError::InvalidMetadata {
                    key: "tokenizer.ggml.merges",
                    message: format!("merge `{m}` is not two space-separated tokens"),
                }
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(build_error("byte-level BPE model"))?;

    let mut steps: Vec<PreTokenizerWrapper> = Vec::with_capacity(pre.regexes.len() + 1);
    for re in pre.regexes {
        let split =
            Split::new(SplitPattern::Regex((*re).to_owned()), SplitDelimiterBehavior::Isolated, false)
                .map_err(build_error("pre-tokenizer regex"))?;
        steps.push(split.into());
    }
    steps.push(ByteLevel::new(false, false, false).into());

    let mut tok = HfTokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(PreTokenizerSequence::new(steps)));
    tok.with_decoder(Some(ByteLevel::new(false, false, false)));
    Ok(tok)
}

fn build_sentencepiece_bpe(
    tokens: &[String],
    scores: &[f32],
    types: &[i64],
    unk: Option<String>,
    add_space_prefix: bool,
) -> Result<HfTokenizer> {
    let vocab = vocab_map(tokens);
    // Every split of a normal piece into two pieces of the vocabulary is a merge, ranked by
    // the score of the merged piece (SentencePiece merges the highest-scoring pair first).
    let mut ranked: Vec<(f32, u32, usize, &str, &str)> = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        if types.get(id) != Some(&TOKEN_TYPE_NORMAL) {
            continue;
        }
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            let mergeable = |piece: &str| {
                vocab.get(piece).is_some_and(|&i| {
                    matches!(types.get(i as usize), Some(&TOKEN_TYPE_NORMAL | &TOKEN_TYPE_USER_DEFINED))
                })
            };
            if mergeable(left) && mergeable(right) {
                let score = scores.get(id).copied().unwrap_or(f32::MIN);
                ranked.push((score, id as u32, split, left, right));
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let merges = ranked.into_iter().map(|(_, _, _, l, r)| (l.to_owned(), r.to_owned())).collect();

    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder.build().map_err(build_error("SentencePiece BPE model"))?;

    let scheme = if add_space_prefix { PrependScheme::First } else { PrependScheme::Never };
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ").map_err(build_error("decoder"))?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if add_space_prefix {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    let mut tok = HfTokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
    tok.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(tok)
}

type Metadata = HashMap<String, Value>;

fn invalid(key: &'static str, what: &str, got: &Value) -> TokenizerError {
    TokenizerError::InvalidMetadata { key, message: format!("expected {what}, got {:?}", got.value_type()) }
}

fn as_int(v: &Value) -> Option<i64> {
    Some(match v {
        Value::U8(x) => i64::from(*x),
        Value::I8(x) => i64::from(*x),
        Value::U16(x) => i64::from(*x),
        Value::I16(x) => i64::from(*x),
        Value::U32(x) => i64::from(*x),
        Value::I32(x) => i64::from(*x),
        Value::U64(x) => i64::try_from(*x).ok()?,
        Value::I64(x) => *x,
        _ => return None,
    })
}

fn meta_int(md: &Metadata, key: &'static str) -> Result<Option<i64>> {
    md.get(key).map(|v| as_int(v).ok_or_else(|| invalid(key, "an integer", v))).transpose()
}

fn meta_bool(md: &Metadata, key: &'static str) -> Result<Option<bool>> {
    md.get(key)
        .map(|v| match v {
            Value::Bool(b) => Ok(*b),
            other => as_int(other).map(|i| i != 0).ok_or_else(|| invalid(key, "a bool", other)),
        })
        .transpose()
}

fn meta_str<'a>(md: &'a Metadata, key: &'static str) -> Result<Option<&'a str>> {
    md.get(key)
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            other => Err(invalid(key, "a string", other)),
        })
        .transpose()
}

fn meta_array<'a>(md: &'a Metadata, key: &'static str) -> Result<Option<&'a [Value]>> {
    md.get(key)
        .map(|v| match v {
            Value::Array(a) => Ok(a.as_slice()),
            other => Err(invalid(key, "an array", other)),
        })
        .transpose()
}

fn meta_str_array(md: &Metadata, key: &'static str) -> Result<Option<Vec<String>>> {
    meta_array(md, key)?
        .map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(invalid(key, "an array of strings", other)),
                })
                .collect()
        })
        .transpose()
}

fn meta_int_array(md: &Metadata, key: &'static str) -> Result<Option<Vec<i64>>> {
    meta_array(md, key)?
        .map(|a| a.iter().map(|v| as_int(v).ok_or_else(|| invalid(key, "an array of integers", v))).collect())
        .transpose()
}

fn meta_float_array(md: &Metadata, key: &'static str) -> Result<Option<Vec<f32>>> {
    meta_array(md, key)?
        .map(|a| {
            a.iter()
                .map(|v| match v {
                    Value::F32(x) => Ok(*x),
                    Value::F64(x) => Ok(*x as f32),
                    other => as_int(other)
                        .map(|i| i as f32)
                        .ok_or_else(|| invalid(key, "an array of floats", other)),
                })
                .collect()
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pre_tokenizer_regex_compiles() {
        for t in PRE_TOKENIZER_TYPES {
            for re in t.regexes {
                let split = Split::new(
                    SplitPattern::Regex((*re).to_owned()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                );
                assert!(split.is_ok(), "{:?}: {re}: {:?}", t.names, split.err());
            }
        }
        assert!(pre_tokenizer_type("smollm").is_some());
        assert!(pre_tokenizer_type("no-such-pre").is_none());
    }

    #[test]
    fn tokenizer_config_chat_template_forms() {
        let json = serde_json::json!({
            "bos_token": {"content": "<s>"},
            "eos_token": "</s>",
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "T"},
                {"name": "default", "template": "D"}
            ]
        });
        let cfg = TokenizerConfig::from_json(&json);
        assert_eq!(
            cfg,
            Ok(TokenizerConfig {
                bos_token: Some("<s>".into()),
                eos_token: Some("</s>".into()),
                add_bos_token: Some(true),
                chat_template: Some("D".into()),
            })
        );
        let bad = serde_json::json!({"chat_template": 3});
        assert!(TokenizerConfig::from_json(&bad).is_err());
    }

    #[test]
    fn end_of_generation_rule() {
        let lookup = |t: &str| match t {
            "<|im_end|>" => Some(2),
            "<|endoftext|>" => Some(0),
            _ => None,
        };
        assert_eq!(end_of_generation_ids(Some(2), &[], Some("x<|im_end|>"), lookup), vec![2]);
        assert_eq!(end_of_generation_ids(Some(7), &[9], None, lookup), vec![7, 9, 2, 0]);
    }
}
