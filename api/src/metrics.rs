//! Prometheus metrics with vLLM's names and meanings under a `shoal_` prefix, plus the mesh.
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `shoal_num_requests_running` | gauge | sessions generating now (a request with `n` choices counts `n`) |
//! | `shoal_num_requests_waiting` | gauge | requests in the admission queue |
//! | `shoal_time_to_first_token_seconds` | histogram | request arrival to its first token (queueing included) |
//! | `shoal_inter_token_latency_seconds` | histogram | time between consecutive tokens of a session |
//! | `shoal_e2e_request_latency_seconds` | histogram | request arrival to its last token |
//! | `shoal_request_queue_time_seconds` | histogram | time spent waiting for admission |
//! | `shoal_prompt_tokens_total` | counter | prompt tokens of admitted requests |
//! | `shoal_generation_tokens_total` | counter | tokens generated |
//! | `shoal_request_success_total{finished_reason}` | counter | requests ended, by reason: `stop`, `length`, `abort` (client gone, deadline or pipeline failure) |
//! | `shoal_hop_latency_seconds` | histogram | one-way latency from this node to each peer (half a ping's round trip), sampled every few seconds |
//! | `shoal_failovers_total` | counter | sessions moved to another route after a peer failed |
//! | `shoal_decode_steps_total` | counter | decode round trips through the pipeline (each brings one token, or several with speculation) |
//! | `shoal_spec_decode_num_drafts_total` | counter | speculative steps (steps that carried a draft) |
//! | `shoal_spec_decode_num_draft_tokens_total` | counter | draft ids sent |
//! | `shoal_spec_decode_num_accepted_tokens_total` | counter | draft ids the last stage accepted; tokens per speculative round trip = 1 + accepted / drafts |
//! | `shoal_live_peers` | gauge | peers that answered the last ping round |
//! | `shoal_spot_checks_total` | counter | steps re-run on another replica (or this node's weights) and compared |
//! | `shoal_withdrawn_tokens_total` | counter | tokens withdrawn because a peer caught lying had produced them since the last confirmed one (a stream that had sent them ends with an error) |
//! | `shoal_spot_check_bans_total` | counter | peers banned because a spot-check caught them returning wrong results |
//!
//! Every series carries a `model_name` label, as vLLM's do.

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

/// The API's metrics and their registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) running: IntGauge,
    pub(crate) waiting: IntGauge,
    pub(crate) ttft: Histogram,
    pub(crate) itl: Histogram,
    pub(crate) e2e: Histogram,
    pub(crate) queue: Histogram,
    pub(crate) prompt_tokens: IntCounter,
    pub(crate) generation_tokens: IntCounter,
    pub(crate) finished: IntCounterVec,
    pub(crate) hop_latency: Histogram,
    pub(crate) failovers: IntCounter,
    pub(crate) withdrawn_tokens: IntCounter,
    pub(crate) decode_steps: IntCounter,
    pub(crate) spec_drafts: IntCounter,
    pub(crate) spec_draft_tokens: IntCounter,
    pub(crate) spec_accepted_tokens: IntCounter,
    pub(crate) live_peers: IntGauge,
    /// Time to compute one token mask of a constrained request (structured outputs, tools).
    pub(crate) grammar_mask: Histogram,
    spot_checks: IntCounter,
    spot_check_bans: IntCounter,
}

/// Token masks: 10 µs to 100 ms.
const MASK_BUCKETS: &[f64] = &[1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1];
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0, 160.0, 640.0,
];
const ITL_BUCKETS: &[f64] =
    &[0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0];
const E2E_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
    960.0, 1920.0,
];
const HOP_BUCKETS: &[f64] =
    &[0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

impl Metrics {
    /// Metrics of a node serving `model_name`, in a registry of their own.
    pub fn new(model_name: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let opts = |name: &str, help: &str| Opts::new(name, help).const_label("model_name", model_name);
        let hist = |name: &str, help: &str, buckets: &[f64]| -> Result<Histogram, prometheus::Error> {
            let h = Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .const_label("model_name", model_name)
                    .buckets(buckets.to_vec()),
            )?;
            registry.register(Box::new(h.clone()))?;
            Ok(h)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(opts(name, help))?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::with_opts(opts(name, help))?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let finished = IntCounterVec::new(
            opts("shoal_request_success_total", "Requests ended, by finish reason."),
            &["finished_reason"],
        )?;
        registry.register(Box::new(finished.clone()))?;
        Ok(Self {
            running: gauge("shoal_num_requests_running", "Sessions generating now.")?,
            waiting: gauge("shoal_num_requests_waiting", "Requests waiting for admission.")?,
            ttft: hist(
                "shoal_time_to_first_token_seconds",
                "Request arrival to its first token.",
                TTFT_BUCKETS,
            )?,
            itl: hist("shoal_inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)?,
            e2e: hist(
                "shoal_e2e_request_latency_seconds",
                "Request arrival to its last token.",
                E2E_BUCKETS,
            )?,
            queue: hist(
                "shoal_request_queue_time_seconds",
                "Time spent waiting for admission.",
                TTFT_BUCKETS,
            )?,
            prompt_tokens: counter("shoal_prompt_tokens_total", "Prompt tokens of admitted requests.")?,
            generation_tokens: counter("shoal_generation_tokens_total", "Tokens generated.")?,
            finished,
            hop_latency: hist(
                "shoal_hop_latency_seconds",
                "One-way latency to each peer (half a ping round trip).",
                HOP_BUCKETS,
            )?,
            failovers: counter("shoal_failovers_total", "Sessions moved to another route after a failure.")?,
            withdrawn_tokens: counter(
                "shoal_withdrawn_tokens_total",
                "Tokens withdrawn because a peer caught lying had produced them.",
            )?,
            decode_steps: counter("shoal_decode_steps_total", "Decode round trips through the pipeline.")?,
            spec_drafts: counter("shoal_spec_decode_num_drafts_total", "Speculative steps (with a draft).")?,
            spec_draft_tokens: counter("shoal_spec_decode_num_draft_tokens_total", "Draft ids sent.")?,
            spec_accepted_tokens: counter(
                "shoal_spec_decode_num_accepted_tokens_total",
                "Draft ids the last stage accepted.",
            )?,
            live_peers: gauge("shoal_live_peers", "Peers that answered the last ping round.")?,
            grammar_mask: hist(
                "shoal_grammar_mask_seconds",
                "Time to compute the token mask of one step of a constrained request.",
                MASK_BUCKETS,
            )?,
            spot_checks: counter("shoal_spot_checks_total", "Steps checked on another replica.")?,
            spot_check_bans: counter(
                "shoal_spot_check_bans_total",
                "Peers banned because a spot-check caught them returning wrong results.",
            )?,
            registry,
        })
    }

    /// Counts a request that ended with `reason` (`stop`, `length` or `abort`).
    pub(crate) fn finished(&self, reason: &str) {
        self.finished.with_label_values(&[reason]).inc();
    }

    /// Brings the spot-check counters up to the driver's totals `(checks, bans)`.
    pub(crate) fn spot_checked(&self, (checks, bans): (u64, u64)) {
        self.spot_checks.inc_by(checks.saturating_sub(self.spot_checks.get()));
        self.spot_check_bans.inc_by(bans.saturating_sub(self.spot_check_bans.get()));
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# error: {e}\n"))
    }
}
