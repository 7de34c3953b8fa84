//! `shoal generate`: a completion from the whole model in this process.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_model_shards::chat_template::ChatMessage;
use shoal_model_shards::generate::{Flow, generate};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::{DType, Device, Model, Shard};

/// Arguments of `shoal generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Model: a .gguf file or a Hugging Face directory.
    #[arg(long, env = "SHOAL_MODEL", default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// The prompt text.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt as one user message with the model's chat template.
    #[arg(long)]
    chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    top_k: Option<u32>,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Seed of the deterministic sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON line instead of the text.
    #[arg(long)]
    json: bool,
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
    finish_reason: shoal_model_shards::generate::FinishReason,
}

/// Runs `shoal generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..SamplingParams::default()
    };
    params.validate()?;
    let model = Model::open(&args.model).with_context(|| format!("opening {}", args.model.display()))?;
    let tokenizer = model.tokenizer().context("loading the tokenizer")?;
    let text = if args.chat {
        let template = model.chat_template()?.context("the model has no chat template; drop --chat")?;
        template.render(&[ChatMessage { role: "user".into(), content: args.prompt.clone() }], true)?
    } else {
        args.prompt.clone()
    };
    // A chat template writes its own special tokens.
    let prompt = tokenizer.encode(&text, !args.chat)?;
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let n_layers = model.spec().n_layers;
    let shard = Shard::load(&model, 0..n_layers, &Device::Cpu, DType::F32)?;
    let mut stop_ids = tokenizer.eos_ids().to_vec();
    stop_ids.extend(model.config_eos_ids());

    let mut decoder = tokenizer.incremental_decoder();
    let mut stdout = std::io::stdout().lock();
    let mut text_out = String::new();
    let mut write_err = None;
    let generation =
        generate(std::slice::from_ref(&shard), &prompt, &params, args.max_tokens, &stop_ids, |tok| {
            match decoder.push(tok.id) {
                Ok(Some(piece)) => {
                    text_out.push_str(&piece);
                    if !args.json
                        && let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|()| stdout.flush())
                    {
                        write_err = Some(e);
                        return Flow::Stop;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "detokenization failed");
                }
            }
            Flow::Continue
        })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let tail = decoder.finish()?;
    text_out.push_str(&tail);
    let n = generation.token_ids.len();
    let prefill_tok_s = prompt.len() as f64 / generation.prefill_time.as_secs_f64().max(1e-9);
    let decode_tok_s = n.saturating_sub(1) as f64 / generation.decode_time.as_secs_f64().max(1e-9);
    if args.json {
        let line = JsonOutput {
            text: &text_out,
            token_ids: &generation.token_ids,
            prompt_tokens: prompt.len(),
            completion_tokens: n,
            prefill_tok_s,
            decode_tok_s,
            finish_reason: generation.finish_reason,
        };
        writeln!(stdout, "{}", serde_json::to_string(&line)?)?;
    } else {
        writeln!(stdout, "{tail}")?;
    }
    stdout.flush()?;
    eprintln!(
        "prompt {} tokens at {:.1} tok/s; generated {} tokens at {:.1} tok/s; finish {:?}",
        prompt.len(),
        prefill_tok_s,
        n,
        decode_tok_s,
        generation.finish_reason
    );
    Ok(())
}
