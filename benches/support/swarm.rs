//! What the end-to-end benches share: the model and runtime from the environment, and a
//! model split evenly into in-process stages (each its own iroh endpoint on 127.0.0.1 with its
//! own compute thread, as `shoal run` builds them).

use std::time::Duration;

use shoal_model_shards::{DType, Device, Model, Shard};
use shoal_worker::net::{Node, NodeOptions};
use shoal_worker::service::{StageConfig, StageService};

/// Reads an integer from the environment.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Sizes the compute pools from `SHOAL_THREADS`, opens `SHOAL_MODEL` (default: SmolLM2) and
/// builds the network runtime. Call first thing in `main`.
pub fn setup() -> (Model, [u8; 32], tokio::runtime::Runtime) {
    // The workspace's model: this file is built into the root package's benches and into
    // member crates' (whose manifest directory is one below the workspace).
    let path = std::env::var("SHOAL_MODEL").unwrap_or_else(|_| {
        let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let file = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
        let local = here.join(file);
        let path = if local.exists() { local } else { here.join("..").join(file) };
        path.display().to_string()
    });
    let threads = std::env::var("SHOAL_THREADS").ok().and_then(|v| v.parse().ok());
    // SAFETY: no thread pool has started yet.
    unsafe { shoal_model_shards::threads::configure_threads(threads) };
    let model = Model::open(&path).expect("model opens (run deploy/fetch-model.sh)");
    let model_id = model.model_id().expect("model id");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(shoal_worker::net::default_net_threads())
        .enable_all()
        .build()
        .expect("runtime");
    (model, model_id, rt)
}

/// `model` split evenly into `stages` served stages.
pub async fn start_stages(model: &Model, model_id: [u8; 32], stages: usize) -> Vec<Node> {
    let n = model.spec().n_layers;
    let mut nodes = Vec::new();
    for i in 0..stages {
        let span = (i * n / stages)..((i + 1) * n / stages);
        let shard = Shard::load(model, span, &Device::Cpu, DType::F32).expect("span loads");
        let config = StageConfig {
            max_sessions: 8,
            kv_budget_bytes: 1 << 30,
            per_peer_sessions: 8,
            per_forwarder_sessions: 64,
            idle_timeout: Duration::from_secs(60),
            max_seq_len: 4096,
            model_id,
        };
        // Stages in one process share its cores: they wait a moment for batches to fill.
        let options = NodeOptions { batch_wait: stages > 1, ..NodeOptions::loopback() };
        let node = Node::bind(options).await.expect("stage binds");
        node.serve(StageService::new(shard, config));
        nodes.push(node);
    }
    nodes
}
