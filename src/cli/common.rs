//! What the subcommands share: the default model, the generation options and their
//! printing, and generating through a pipeline driver (`shoal run --prompt`, `shoal generate
//! --join`). The subcommands import these from here; apart from that only `run`, `worker`
//! (serving the API) and `bench` (the spans of `run`) import another subcommand's module, and
//! nothing imports back.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_coordinator_free_router::driver::{Driver, Request};
use shoal_model_shards::Model;
use shoal_model_shards::chat_template::ChatMessage;
use shoal_model_shards::generate::{FinishReason, Flow};
use shoal_model_shards::sampler::SamplingParams;
use shoal_model_shards::tokenizer::{IncrementalDecoder, Tokenizer};
use shoal_worker::net::{Node, short};

use crate::node::{DriverArgs, SwarmArgs, SwarmOrigin, wait_for_route};

/// The model `shoal` uses when none is given (fetched by `deploy/fetch-model.sh`).
pub const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Generation options shared by `shoal generate` and `shoal run`.
#[derive(Debug, Clone, Args)]
pub struct GenOptions {
    /// Wrap the prompt as one user message with the model's chat template.
    #[arg(long, env = "SHOAL_CHAT")]
    pub chat: bool,
    /// Maximum tokens to generate.
    #[arg(long, env = "SHOAL_MAX_TOKENS", default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, env = "SHOAL_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass.
    #[arg(long, env = "SHOAL_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the k most likely tokens.
    #[arg(long, env = "SHOAL_TOP_K")]
    pub top_k: Option<u32>,
    /// Drop tokens below this fraction of the top token's probability.
    #[arg(long, env = "SHOAL_MIN_P", default_value_t = 0.0)]
    pub min_p: f32,
    /// Repetition penalty (1 = off).
    #[arg(long, env = "SHOAL_REPETITION_PENALTY", default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the deterministic sampler.
    #[arg(long, env = "SHOAL_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON line instead of the text.
    #[arg(long, env = "SHOAL_JSON")]
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
        template.render(&[ChatMessage::new("user", prompt)], true)?
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
    ids: Vec<u32>,
    write_err: Option<std::io::Error>,
}

impl Printer {
    /// A printer for `tokenizer`'s ids.
    pub fn new(tokenizer: &Tokenizer, json: bool) -> Self {
        Self {
            decoder: tokenizer.incremental_decoder(),
            json,
            text: String::new(),
            ids: Vec::new(),
            write_err: None,
        }
    }

    /// Ids handled so far.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The tokens from `from` on were withdrawn (a spot-check caught a worker lying; see
    /// `TokenEvent`): the text is rebuilt from the ones before. What was printed stays, with
    /// a note on stderr.
    pub fn withdraw(&mut self, tokenizer: &Tokenizer, from: usize) {
        self.ids.truncate(from);
        self.decoder = tokenizer.incremental_decoder();
        self.text.clear();
        for &id in &self.ids {
            if let Ok(Some(piece)) = self.decoder.push(id) {
                self.text.push_str(&piece);
            }
        }
        if !self.json {
            eprintln!(
                "\n[a worker was caught returning wrong results: the text from token {from} on follows again]"
            );
        }
    }

    /// Handles one generated id; `Flow::Stop` when stdout is gone.
    pub fn token(&mut self, id: u32) -> Flow {
        self.ids.push(id);
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

/// `shoal generate --join`: this process (`origin`) is the origin; the swarm's workers
/// compute. Waits at most `wait` seconds for the swarm to cover every layer.
#[allow(clippy::too_many_arguments)]
pub async fn generate_remote(
    model: &Model,
    model_id: [u8; 32],
    origin: Node,
    p: Prepared,
    options: &GenOptions,
    tickets: &[String],
    args: &DriverArgs,
    swarm: &SwarmArgs,
    wait: f64,
) -> Result<()> {
    let swarm = SwarmOrigin::join(model, model_id, origin, args.config(), tickets, swarm).await?;
    wait_for_route(&swarm.driver, Duration::from_secs_f64(wait.max(0.0))).await?;
    generate_with(&swarm.driver, p, options).await
}

/// Generates through `driver` and prints like `shoal generate`.
pub async fn generate_with(driver: &Driver, p: Prepared, options: &GenOptions) -> Result<()> {
    let request = Request {
        prompt: p.prompt.clone(),
        params: p.params.clone(),
        max_tokens: options.max_tokens,
        stop_ids: p.stop_ids.clone(),
        top_logprobs: 0,
        constraint: None,
    };
    let mut printer = Printer::new(&p.tokenizer, options.json);
    let outcome = driver
        .generate(&request, |ev| {
            if ev.index < printer.len() {
                printer.withdraw(&p.tokenizer, ev.index);
            }
            printer.token(ev.token)
        })
        .await?;
    if outcome.tokens.len() < printer.len() {
        printer.withdraw(&p.tokenizer, outcome.tokens.len());
    }
    for f in &outcome.failovers {
        eprintln!(
            "recovered at token {}: {} (banned [{}]; detected after {:.2?}, stalled {:.2?})",
            f.at_token,
            f.reason,
            f.banned.join(", "),
            f.detection,
            f.stall
        );
    }
    tracing::info!(route = ?outcome.route.iter().map(short).collect::<Vec<_>>(), "done");
    printer.finish(
        p.prompt.len(),
        &outcome.tokens,
        outcome.finish_reason,
        outcome.prefill_time,
        outcome.decode_time,
    )
}

/// Parses a size: a number with an optional unit, `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// `T`/`TiB` (powers of 1024), or `KB`, `MB`, `GB`, `TB` (powers of 1000); case-insensitive.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().with_context(|| format!("{s:?} is not a size like 512MiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => bail!("{s:?}: unknown unit {other:?}"),
    };
    let bytes = value * mult;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        bail!("{s:?} is not a usable size");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size(" 3 GB ").unwrap(), 3_000_000_000);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        for bad in ["", "MiB", "12 parsecs", "0", "-1G", "1e400", "0.1"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
