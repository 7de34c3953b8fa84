//! `shoal generate`: a completion from the whole model in this process.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_model_shards::chat_template::ChatMessage;
use shoal_model_shards::generate::{FinishReason, Flow, generate};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::tokenizer::{IncrementalDecoder, Tokenizer};
use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::Node;

use crate::weights::Weights;

/// Arguments of `shoal generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a .gguf file or a Hugging Face directory (default: the default model file; with
    /// `--join` and no `--model`, the swarm's model, of which only the header is fetched).
    #[arg(long, env = "SHOAL_MODEL")]
    model: Option<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    options: GenOptions,
    /// Generate through the swarm of this node's ticket (repeatable; one is enough) instead
    /// of locally; this process then only tokenizes and routes (`--discovery local` also
    /// generates through the swarm, found on the local network).
    #[arg(long = "join", value_name = "TICKET")]
    join: Vec<String>,
    /// With `--join`: seconds to wait for the swarm to cover every layer.
    #[arg(long, default_value_t = 30.0, value_name = "SECS")]
    route_wait: f64,
    #[command(flatten)]
    net: crate::node::DriverArgs,
    #[command(flatten)]
    swarm: crate::node::SwarmArgs,
    #[command(flatten)]
    data: crate::weights::DataArgs,
}

/// The model `shoal` uses when none is given (fetched by `deploy/fetch-model.sh`).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Generation options shared by `shoal generate` and `shoal run`.
#[derive(Debug, Clone, Args)]
pub struct GenOptions {
    /// Wrap the prompt as one user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the deterministic sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON line instead of the text.
    #[arg(long)]
    pub json: bool,
}

/// The `--json` line.
#[derive(serde::Serialize)]
struct JsonOutput<'a> {
    text: &'a str,
    token_ids: &'a [u32],
    prompt_tokens: usize,
    completion_tokens: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    finish_reason: FinishReason,
}

/// A prompt ready to generate from.
pub struct Prepared {
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Validated sampling parameters.
    pub params: SamplingParams,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
}

/// Tokenizes `prompt` (through the chat template with `--chat`) and validates the options.
pub fn prepare(model: &Model, prompt: &str, o: &GenOptions) -> Result<Prepared> {
    let params = SamplingParams {
        temperature: o.temperature,
        top_k: o.top_k,
        top_p: o.top_p,
        min_p: o.min_p,
        repetition_penalty: o.repetition_penalty,
        seed: o.seed,
        ..SamplingParams::default()
    };
    params.validate()?;
    let tokenizer = model.tokenizer().context("loading the tokenizer")?;
    let text = if o.chat {
        let template = model.chat_template()?.context("the model has no chat template; drop --chat")?;
        template.render(&[ChatMessage { role: "user".into(), content: prompt.to_owned() }], true)?
    } else {
        prompt.to_owned()
    };
    // A chat template writes its own special tokens.
    let ids = tokenizer.encode(&text, !o.chat)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut stop_ids = tokenizer.eos_ids().to_vec();
    stop_ids.extend(model.config_eos_ids());
    Ok(Prepared { tokenizer, prompt: ids, params, stop_ids })
}

/// Streams generated text to stdout (or collects it for `--json`) and prints the summary.
pub struct Printer {
    decoder: IncrementalDecoder,
    json: bool,
    text: String,
    write_err: Option<std::io::Error>,
}

impl Printer {
    /// A printer for `tokenizer`'s ids.
    pub fn new(tokenizer: &Tokenizer, json: bool) -> Self {
        Self { decoder: tokenizer.incremental_decoder(), json, text: String::new(), write_err: None }
    }

    /// Handles one generated id; `Flow::Stop` when stdout is gone.
    pub fn token(&mut self, id: u32) -> Flow {
        match self.decoder.push(id) {
            Ok(Some(piece)) => {
                self.text.push_str(&piece);
                if !self.json {
                    let mut out = std::io::stdout().lock();
                    if let Err(e) = out.write_all(piece.as_bytes()).and_then(|()| out.flush()) {
                        self.write_err = Some(e);
                        return Flow::Stop;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "detokenization failed"),
        }
        Flow::Continue
    }

    /// Prints the end of the text (or the JSON line) and the speed summary on stderr.
    pub fn finish(
        mut self,
        prompt_len: usize,
        token_ids: &[u32],
        finish_reason: FinishReason,
        prefill_time: Duration,
        decode_time: Duration,
    ) -> Result<()> {
        if let Some(e) = self.write_err {
            return Err(e).context("writing to stdout");
        }
        let tail = self.decoder.finish()?;
        self.text.push_str(&tail);
        let n = token_ids.len();
        let prefill_tok_s = prompt_len as f64 / prefill_time.as_secs_f64().max(1e-9);
        let decode_tok_s = n.saturating_sub(1) as f64 / decode_time.as_secs_f64().max(1e-9);
        let mut stdout = std::io::stdout().lock();
        if self.json {
            let line = JsonOutput {
                text: &self.text,
                token_ids,
                prompt_tokens: prompt_len,
                completion_tokens: n,
                prefill_tok_s,
                decode_tok_s,
                finish_reason,
            };
            writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
        } else {
            writeln!(stdout, "{tail}")?;
        }
        stdout.flush()?;
        eprintln!(
            "prompt {prompt_len} tokens at {prefill_tok_s:.1} tok/s; generated {n} tokens at {decode_tok_s:.1} tok/s; finish {finish_reason:?}"
        );
        Ok(())
    }
}

/// Runs `shoal generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    if !args.join.is_empty() || args.net.net.local_discovery() {
        let tickets = crate::node::parse_tickets(&args.join)?;
        let local = args.model.as_deref().map(|m| Weights::local(m, &args.data)).transpose()?;
        return crate::node::runtime()?.block_on(async {
            let origin = Node::bind(args.net.net.options(None)).await?;
            let weights = match local {
                Some(w) => Ok(w),
                None => Weights::from_swarm(&origin, &tickets, &args.data).await,
            };
            let run = async {
                let weights = weights?;
                let p = prepare(&weights.model, &args.prompt, &args.options)?;
                crate::cli::run::generate_remote(
                    &weights.model,
                    weights.model_id,
                    origin.clone(),
                    p,
                    &args.options,
                    &args.join,
                    &args.net,
                    &args.swarm,
                    args.route_wait,
                )
                .await
            };
            let result = run.await;
            origin.shutdown().await;
            result
        });
    }
    let path = args.model.unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
    let model = Model::open(&path).with_context(|| format!("opening {}", path.display()))?;
    let p = prepare(&model, &args.prompt, &args.options)?;
    let n_layers = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n_layers, &Device::Cpu, DType::F32)?;
    let mut printer = Printer::new(&p.tokenizer, args.options.json);
    let generation = generate(
        std::slice::from_ref(&shard),
        &p.prompt,
        &p.params,
        args.options.max_tokens,
        &p.stop_ids,
        |tok| printer.token(tok.id),
    )?;
    printer.finish(
        p.prompt.len(),
        &generation.token_ids,
        generation.finish_reason,
        generation.prefill_time,
        generation.decode_time,
    )
}
