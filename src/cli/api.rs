//! The OpenAI-compatible API: its options (shared by `shoal run --listen`, `shoal api` and
//! `shoal worker --api`), the `shoal api` subcommand, and serving it in front of a driver.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use shoal_api::defaults::SamplingDefaults;
use shoal_api::server::ServerLimits;
use shoal_api::{ApiConfig, ApiState, ServedModel, router, watch_mesh};
use shoal_coordinator_free_router::driver::Driver;
use shoal_model_shards::Model;

use crate::cli::dashboard::Dashboard;
use crate::node::{DriverArgs, SwarmArgs, SwarmOrigin, parse_tickets, runtime, shutdown_signal};
use crate::weights::{DataArgs, Weights};

/// Options of the API server.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// An API key that `/v1/*` requires (`Authorization: Bearer KEY`).
    #[arg(long, env = "SHOAL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A file of API keys, one per line (blank lines and `#` comments ignored).
    #[arg(long, env = "SHOAL_API_KEY_FILE", value_name = "FILE")]
    pub api_key_file: Option<PathBuf>,
    /// The model's name in the API (default: the model file's stem).
    #[arg(long, env = "SHOAL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Most sessions generating at once (a request with n choices holds n).
    #[arg(long, env = "SHOAL_MAX_RUNNING", default_value_t = 16)]
    pub max_running: usize,
    /// Most requests waiting for a free session; beyond it requests get 429.
    #[arg(long, env = "SHOAL_MAX_WAITING", default_value_t = 64)]
    pub max_waiting: usize,
    /// Seconds from a request's arrival to its first token (queueing included) before it
    /// fails with 503.
    #[arg(long, env = "SHOAL_FIRST_TOKEN_TIMEOUT", default_value_t = 120.0)]
    pub first_token_timeout: f64,
    /// Seconds allowed between two tokens before the request fails with 503.
    #[arg(long, env = "SHOAL_TOKEN_TIMEOUT", default_value_t = 30.0)]
    pub token_timeout: f64,
    /// Most choices per request (`n`).
    #[arg(long, env = "SHOAL_MAX_N", default_value_t = 8)]
    pub max_n: usize,
    /// Cap the context (prompt plus completion) below the model's.
    #[arg(long, env = "SHOAL_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Largest request body, in KiB.
    #[arg(long, env = "SHOAL_MAX_BODY_KIB", default_value_t = 4096)]
    pub max_body_kib: usize,
    /// Where sampling defaults come from besides `--default-*`: `auto` takes the model's
    /// recommendations (a Hugging Face directory's generation_config.json, a GGUF's
    /// general.sampling.* keys), `none` ignores them.
    #[arg(long, env = "SHOAL_GENERATION_CONFIG", default_value = "auto", value_parser = ["auto", "none"])]
    pub generation_config: String,
    /// Temperature of requests that send none (wins over the model's recommendation).
    #[arg(long, env = "SHOAL_DEFAULT_TEMPERATURE", value_name = "T")]
    pub default_temperature: Option<f32>,
    /// top_p of requests that send none.
    #[arg(long, env = "SHOAL_DEFAULT_TOP_P", value_name = "P")]
    pub default_top_p: Option<f32>,
    /// top_k of requests that send none (0 disables top-k).
    #[arg(long, env = "SHOAL_DEFAULT_TOP_K", value_name = "K")]
    pub default_top_k: Option<u32>,
    /// min_p of requests that send none.
    #[arg(long, env = "SHOAL_DEFAULT_MIN_P", value_name = "P")]
    pub default_min_p: Option<f32>,
    /// repetition_penalty of requests that send none.
    #[arg(long, env = "SHOAL_DEFAULT_REPETITION_PENALTY", value_name = "R")]
    pub default_repetition_penalty: Option<f32>,
    /// An origin whose web pages may call the API from a browser (CORS), e.g.
    /// `http://localhost:3000`; repeatable (the env twin takes a comma-separated list); `*`
    /// allows any. None by default: browsers refuse cross-origin calls.
    #[arg(long = "cors-origin", env = "SHOAL_CORS_ORIGIN", value_name = "ORIGIN", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Serve `/metrics` without an API key (by default it needs one when keys are set).
    #[arg(long, env = "SHOAL_PUBLIC_METRICS")]
    pub public_metrics: bool,
    /// Most HTTP connections open at once; one more is answered 503 and closed.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers (on opening, and between
    /// requests on keep-alive) before it is closed.
    #[arg(long, env = "SHOAL_HEADER_TIMEOUT", default_value_t = 10.0, value_name = "SECS")]
    pub header_timeout: f64,
    /// Seconds a request's body may take to arrive once its headers have (408 beyond).
    #[arg(long, env = "SHOAL_BODY_TIMEOUT", default_value_t = 30.0, value_name = "SECS")]
    pub body_timeout: f64,
}

impl ApiArgs {
    /// The API's configuration (reads the key file).
    pub fn config(&self) -> Result<ApiConfig> {
        let mut keys: Vec<String> = self.api_key.iter().filter(|k| !k.is_empty()).cloned().collect();
        if let Some(path) = &self.api_key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the key file {}", path.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned),
            );
            if keys.is_empty() {
                bail!("the key file {} holds no key", path.display());
            }
        }
        let secs = |s: f64, name: &str| {
            if s.is_finite() && s > 0.0 {
                Ok(Duration::from_secs_f64(s))
            } else {
                bail!("--{name} must be positive")
            }
        };
        if self.max_running == 0 {
            bail!("--max-running must be at least 1");
        }
        let sampling = SamplingDefaults {
            temperature: self.default_temperature,
            top_p: self.default_top_p,
            top_k: self.default_top_k,
            min_p: self.default_min_p,
            repetition_penalty: self.default_repetition_penalty,
        };
        sampling.check("--default-* options")?;
        for origin in &self.cors_origins {
            let ok = origin == "*"
                || (origin.starts_with("http://") || origin.starts_with("https://"))
                    && !origin.ends_with('/')
                    && axum::http::HeaderValue::from_str(origin).is_ok();
            if !ok {
                bail!("--cors-origin {origin:?} is not an origin: give scheme://host[:port] (no path), or *");
            }
        }
        Ok(ApiConfig {
            max_body_bytes: self.max_body_kib.saturating_mul(1024),
            api_keys: keys,
            max_running: self.max_running,
            max_waiting: self.max_waiting,
            first_token_timeout: secs(self.first_token_timeout, "first-token-timeout")?,
            token_timeout: secs(self.token_timeout, "token-timeout")?,
            max_n: self.max_n.max(1),
            max_model_len: self.max_model_len,
            sampling,
            cors_origins: self.cors_origins.clone(),
            public_metrics: self.public_metrics,
            body_timeout: secs(self.body_timeout, "body-timeout")?,
        })
    }

    /// The HTTP server's limits.
    pub fn server_limits(&self) -> Result<ServerLimits> {
        if self.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if !(self.header_timeout.is_finite() && self.header_timeout > 0.0) {
            bail!("--header-timeout must be positive");
        }
        Ok(ServerLimits {
            max_connections: self.max_connections,
            header_timeout: Duration::from_secs_f64(self.header_timeout),
        })
    }
}

/// Arguments of `shoal api`.
#[derive(Debug, Args)]
pub struct ApiCommandArgs {
    /// Model: a .gguf file or a Hugging Face directory (for its tokenizer, chat template and
    /// identity; this node computes nothing). Without it, the swarm's model: only its header
    /// is fetched, into `--data-dir`.
    #[arg(long, env = "SHOAL_MODEL")]
    model: Option<PathBuf>,
    /// A node of the swarm to join through (repeatable; one is enough): routes go through
    /// every worker the swarm announces. Needed unless `--discovery local` finds the swarm
    /// on the local network.
    #[arg(long = "join", env = "SHOAL_JOIN", value_name = "TICKET", value_delimiter = ',')]
    join: Vec<String>,
    /// Address of the HTTP server.
    #[arg(long, env = "SHOAL_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    #[command(flatten)]
    api: ApiArgs,
    #[command(flatten)]
    driver: DriverArgs,
    #[command(flatten)]
    swarm: SwarmArgs,
    #[command(flatten)]
    data: DataArgs,
}

/// Runs `shoal api`.
pub fn run(args: ApiCommandArgs) -> Result<()> {
    let local = args.model.as_deref().map(|m| Weights::local(m, &args.data)).transpose()?;
    let tickets = parse_tickets(&args.join)?;
    if args.join.is_empty() && !args.driver.net.local_discovery() {
        bail!(
            "give a worker's ticket with --join TICKET (or find the swarm on the LAN with --discovery local)"
        );
    }
    args.swarm.config()?;
    runtime()?.block_on(async move {
        let origin = crate::node::bind(args.driver.net.options(None)?).await?;
        let result = async {
            let weights = match local {
                Some(w) => w,
                None => Weights::from_swarm(&origin, &tickets, &args.data).await?,
            };
            let swarm = SwarmOrigin::join(
                &weights.model,
                weights.model_id,
                origin.clone(),
                args.driver.config(),
                &args.join,
                &args.swarm,
            )
            .await?;
            serve(&weights.model, &weights.name(), swarm.driver.clone(), args.listen, &args.api).await
        }
        .await;
        origin.shutdown().await;
        result
    })
}

/// Serves the API in front of `driver` until Ctrl-C or SIGTERM.
/// The model is called `--served-model-name`, else `default_name`.
pub async fn serve(
    model: &Model,
    default_name: &str,
    driver: Arc<Driver>,
    addr: SocketAddr,
    args: &ApiArgs,
) -> Result<()> {
    let name = args.served_model_name.clone().unwrap_or_else(|| default_name.to_owned());
    let mut served = ServedModel::of(model, name.clone()).context("reading the model's tokenizer")?;
    if args.generation_config == "auto" {
        served.sampling = SamplingDefaults::of_model(model)
            .context("reading the model's recommended sampling (--generation-config none ignores it)")?;
    }
    let state = Arc::new(ApiState::new(driver, served, args.config()?).context("metrics")?);
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_mesh(state.clone(), Duration::from_secs(5)));
    let dashboard = Dashboard::new(state.clone(), model.spec().n_layers);
    tasks.spawn(dashboard.clone().run_sampler());
    let keys = if state.config.api_keys.is_empty() { "no API key" } else { "API key required" };
    println!("listening: http://{local}/v1 (model {name}, {keys})");
    println!(
        "sampling defaults: {} (the model recommends: {}; a request's own fields win)",
        state.sampling_defaults().describe(),
        state.model.sampling.describe()
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let app = router(state).merge(crate::cli::dashboard::router(dashboard));
    let served = shoal_api::server::serve(listener, app, args.server_limits()?, shutdown_signal()).await;
    tasks.abort_all();
    served.context("serving the API")
}
