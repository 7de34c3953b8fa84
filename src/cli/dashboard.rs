//! The swarm dashboard every API node serves: `GET /dashboard` (one HTML page with its script
//! and style, embedded in the binary: no CDN, nodes may be offline) and `GET
//! /dashboard/state` (the JSON it polls every two seconds).
//!
//! The state is this node's view: the peers its driver knows (span, serving or not, speed,
//! sessions, free KV, round trip, failures and bans), the serving throughput over each layer,
//! and, sampled from the node's own metrics every two seconds, requests and generated tokens
//! per second over the last ten minutes and the failovers seen. The page's chat box calls the
//! node's own `/v1/chat/completions` (with an API key typed into the page when one is needed).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use shoal_api::ApiState;
use shoal_worker::net::short;

/// The page (HTML, CSS and script in one file).
const PAGE: &str = include_str!("dashboard/index.html");
/// How often the metrics are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// Samples kept: ten minutes.
const SAMPLES: usize = 300;
/// Failover and ban events kept.
const EVENTS: usize = 20;

/// One sample of the node's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    requests: f64,
    tokens: f64,
    failovers: f64,
    running: f64,
    waiting: f64,
}

/// What the sampler keeps.
#[derive(Debug, Default)]
struct History {
    samples: VecDeque<(Instant, Counters)>,
    events: VecDeque<Event>,
}

/// A failover or a ban this node saw.
#[derive(Debug, Clone, Serialize)]
struct Event {
    /// Unix time, seconds.
    at: u64,
    /// What happened.
    what: String,
}

/// The dashboard's state: the API's state and the sampled history.
pub struct Dashboard {
    api: Arc<ApiState>,
    n_layers: usize,
    history: Mutex<History>,
    started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The sum of a metric's series in Prometheus' text format (`name` or `name{...}`).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Dashboard {
    /// A dashboard over `api`, whose model has `n_layers` layers.
    pub fn new(api: Arc<ApiState>, n_layers: usize) -> Arc<Self> {
        Arc::new(Self { api, n_layers, history: Mutex::new(History::default()), started: Instant::now() })
    }

    /// Reads the node's counters.
    fn counters(&self) -> Counters {
        let text = self.api.metrics().render();
        Counters {
            requests: metric(&text, "shoal_request_success_total"),
            tokens: metric(&text, "shoal_generation_tokens_total"),
            failovers: metric(&text, "shoal_failovers_total"),
            running: metric(&text, "shoal_num_requests_running"),
            waiting: metric(&text, "shoal_num_requests_waiting"),
        }
    }

    /// Takes one sample (and notes new failovers and bans).
    fn sample(&self) {
        let now = Instant::now();
        let c = self.counters();
        let banned: Vec<String> = self
            .api
            .driver
            .peers()
            .iter()
            .filter(|(_, p)| p.banned_until.is_some_and(|t| t > now))
            .map(|(id, p)| format!("{} (after {} failures)", short(id), p.failures))
            .collect();
        let mut h = lock(&self.history);
        if let Some((_, last)) = h.samples.back().copied()
            && c.failovers > last.failovers
        {
            let n = c.failovers - last.failovers;
            h.events.push_back(Event { at: unix_now(), what: format!("{n} failover(s)") });
        }
        for b in banned {
            let what = format!("banned {b}");
            if !h.events.iter().rev().take(EVENTS).any(|e| e.what == what && unix_now() - e.at < 30) {
                h.events.push_back(Event { at: unix_now(), what });
            }
        }
        while h.events.len() > EVENTS {
            h.events.pop_front();
        }
        h.samples.push_back((now, c));
        while h.samples.len() > SAMPLES {
            h.samples.pop_front();
        }
    }

    /// Samples every [`SAMPLE_EVERY`] until dropped.
    pub async fn run_sampler(self: Arc<Self>) {
        loop {
            self.sample();
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    }

    /// The JSON state.
    fn state(&self) -> StateJson {
        let now = Instant::now();
        let n_layers = self.n_layers;
        let mut coverage = vec![0.0f64; n_layers];
        let members: Vec<Member> = self
            .api
            .driver
            .peers()
            .into_iter()
            .map(|(id, p)| {
                let banned_s = p.banned_until.filter(|t| *t > now).map(|t| (t - now).as_secs_f64());
                let serving = !p.info.draining && banned_s.is_none();
                let span = (p.info.start as usize).min(n_layers)..(p.info.end as usize).min(n_layers);
                if !p.info.draining {
                    for c in &mut coverage[span] {
                        *c += p.throughput;
                    }
                }
                Member {
                    id: short(&id),
                    start: p.info.start,
                    end: p.info.end,
                    state: if banned_s.is_some() {
                        "banned"
                    } else if p.info.draining {
                        "not serving"
                    } else {
                        "serving"
                    },
                    serving,
                    throughput: p.throughput,
                    sessions: p.info.sessions,
                    free_kv_mib: p.info.free_kv_bytes as f64 / f64::from(1u32 << 20),
                    rtt_ms: p.rtt.as_secs_f64() * 1000.0,
                    failures: p.failures,
                    banned_s,
                }
            })
            .collect();
        let h = lock(&self.history);
        let series = h
            .samples
            .iter()
            .zip(h.samples.iter().skip(1))
            .map(|((t0, a), (t1, b))| {
                let dt = (*t1 - *t0).as_secs_f64().max(1e-3);
                Point {
                    ago_s: (now - *t1).as_secs_f64(),
                    requests_per_s: (b.requests - a.requests).max(0.0) / dt,
                    tokens_per_s: (b.tokens - a.tokens).max(0.0) / dt,
                }
            })
            .collect();
        let last = h.samples.back().map(|(_, c)| *c).unwrap_or_default();
        StateJson {
            model: self.api.model.name.clone(),
            node: short(&self.api.driver.node().id()),
            uptime_s: self.started.elapsed().as_secs_f64(),
            n_layers,
            bottleneck: coverage.iter().copied().fold(f64::INFINITY, f64::min).min(1e12),
            uncovered: coverage.iter().filter(|c| **c <= 0.0).count(),
            coverage,
            members,
            series,
            requests_total: last.requests,
            tokens_total: last.tokens,
            failovers_total: last.failovers,
            running: last.running,
            waiting: last.waiting,
            events: h.events.iter().rev().cloned().collect(),
            api_key_required: !self.api.config.api_keys.is_empty(),
        }
    }
}

#[derive(Serialize)]
struct Member {
    id: String,
    start: u32,
    end: u32,
    state: &'static str,
    serving: bool,
    throughput: f64,
    sessions: u32,
    free_kv_mib: f64,
    rtt_ms: f64,
    failures: u32,
    banned_s: Option<f64>,
}

#[derive(Serialize)]
struct Point {
    ago_s: f64,
    requests_per_s: f64,
    tokens_per_s: f64,
}

#[derive(Serialize)]
struct StateJson {
    model: String,
    node: String,
    uptime_s: f64,
    n_layers: usize,
    coverage: Vec<f64>,
    bottleneck: f64,
    uncovered: usize,
    members: Vec<Member>,
    series: Vec<Point>,
    requests_total: f64,
    tokens_total: f64,
    failovers_total: f64,
    running: f64,
    waiting: f64,
    events: Vec<Event>,
    api_key_required: bool,
}

async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-cache")], PAGE)
}

async fn state(State(d): State<Arc<Dashboard>>) -> impl IntoResponse {
    ([(header::CACHE_CONTROL, "no-store")], Json(d.state()))
}

/// `GET /dashboard` and `GET /dashboard/state`.
pub fn router(d: Arc<Dashboard>) -> Router {
    Router::new().route("/dashboard", get(page)).route("/dashboard/state", get(state)).with_state(d)
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn metric_sums_a_family_and_ignores_prefixes() {
        let text = "# HELP x\nshoal_request_success_total{finished_reason=\"stop\",model_name=\"m\"} 3\n\
                    shoal_request_success_total{finished_reason=\"length\",model_name=\"m\"} 2\n\
                    shoal_request_success_total_extra 100\nshoal_failovers_total 1\n";
        assert_eq!(metric(text, "shoal_request_success_total"), 5.0);
        assert_eq!(metric(text, "shoal_failovers_total"), 1.0);
        assert_eq!(metric(text, "shoal_missing"), 0.0);
    }
}
