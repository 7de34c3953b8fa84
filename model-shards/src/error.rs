//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model span.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The path is neither a GGUF file nor a Hugging Face model directory.
    #[error(
        "{path} is not a model ({reason}): expected a .gguf file or a directory with config.json and *.safetensors"
    )]
    UnknownFormat {
        /// The path given.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// The model's architecture is not one shoal implements.
    #[error(
        "unsupported architecture `{0}` (supported: llama, mistral, qwen2, qwen3, qwen3moe, gemma3, gemma2, phi3; Mixtral as llama)"
    )]
    UnsupportedArchitecture(String),
    /// A key the model needs is missing from its configuration or metadata.
    #[error("model configuration is missing `{key}`")]
    MissingConfig {
        /// The key that is missing.
        key: String,
    },
    /// A configuration value is present but unusable.
    #[error("invalid model configuration `{key}`: {reason}")]
    InvalidConfig {
        /// The offending key.
        key: String,
        /// Why it is rejected.
        reason: String,
    },
    /// A weight tensor the span needs is missing.
    #[error("weight `{0}` is missing from the model files")]
    MissingWeight(String),
    /// A weight tensor has the wrong shape.
    #[error("weight `{name}` has shape {actual:?}, expected {expected:?}")]
    WeightShape {
        /// The tensor's name.
        name: String,
        /// Its shape in the file.
        actual: Vec<usize>,
        /// The shape the configuration implies.
        expected: Vec<usize>,
    },
    /// The requested layer span does not fit the model.
    #[error("invalid layer span {start}..{end} for a model of {n_layers} layers")]
    InvalidSpan {
        /// First layer.
        start: usize,
        /// One past the last layer.
        end: usize,
        /// Layers in the model.
        n_layers: usize,
    },
    /// The input given to a forward step does not fit this span or session.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A session would grow past the model's maximum length.
    #[error("sequence of {len} tokens exceeds the maximum of {max}")]
    SequenceTooLong {
        /// The length the step would reach.
        len: usize,
        /// The maximum allowed.
        max: usize,
    },
    /// The KV budget has no block left for the step.
    #[error("the KV cache budget is full: the step needs {needed} more bytes, {free} are free")]
    KvCacheFull {
        /// Bytes the step would add.
        needed: usize,
        /// Bytes of the budget still free.
        free: usize,
    },
    /// JSON in a model file is malformed.
    #[error("cannot parse {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// The chat template failed.
    #[error(transparent)]
    ChatTemplate(#[from] crate::chat_template::ChatTemplateError),
    /// Sampling failed.
    #[error(transparent)]
    Sampler(#[from] crate::sampler::SamplerError),
    /// The quantized kernels rejected their input.
    #[error("quantized kernel: {0}")]
    Kernel(String),
    /// A model manifest is malformed or does not fit its file.
    #[error("invalid model manifest: {0}")]
    Manifest(String),
    /// An error from candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
