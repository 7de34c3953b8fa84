//! Memory follows the span: a process holding layers 0..15 of SmolLM2 is resident in clearly
//! less memory than one holding 0..30. Each span is loaded in a child process (this test
//! binary re-run with `SHOAL_SPAN_CHILD` set), which reports its resident set after loading.

mod common;

use std::process::Command;

use shoal_model_shards::{DType, Device, Model, Shard};

const CHILD_ENV: &str = "SHOAL_SPAN_CHILD";

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS line");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value")
}

/// The child half: loads the span named in the environment and prints its resident set.
#[test]
fn span_child() -> anyhow::Result<()> {
    let Ok(span) = std::env::var(CHILD_ENV) else {
        return Ok(()); // only meaningful when run by `memory_follows_the_span`
    };
    let (a, b) = span.split_once("..").expect("span as A..B");
    let (a, b): (usize, usize) = (a.parse()?, b.parse()?);
    let model = Model::open(common::smollm2_path())?;
    let before = rss_kib();
    let shard = Shard::load(&model, a..b, &Device::Cpu, DType::F32)?;
    let after = rss_kib();
    println!("SPAN_RSS {a} {b} {after} {}", after - before);
    drop(shard);
    Ok(())
}

fn child_rss(span: &str) -> anyhow::Result<(u64, u64)> {
    let out = Command::new(std::env::current_exe()?)
        .args(["--exact", "span_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, span)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child for {span} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout.lines().find_map(|l| l.split_once("SPAN_RSS ")).expect("child printed its RSS").1;
    let f: Vec<u64> = line.split_whitespace().take(4).map(|v| v.parse().expect("number")).collect();
    Ok((f[2], f[3]))
}

#[test]
fn memory_follows_the_span() -> anyhow::Result<()> {
    let (half_total, half_weights) = child_rss("0..15")?;
    let (full_total, full_weights) = child_rss("0..30")?;
    let (tail_total, tail_weights) = child_rss("15..30")?;
    println!(
        "resident after loading: 0..15 {} MiB (+{} MiB), 15..30 {} MiB (+{} MiB), 0..30 {} MiB (+{} MiB)",
        half_total / 1024,
        half_weights / 1024,
        tail_total / 1024,
        tail_weights / 1024,
        full_total / 1024,
        full_weights / 1024
    );
    // The 30 blocks hold ~62 MiB of Q4_1 weights and the Q8_0 embedding ~30 MiB: half the
    // blocks plus the embedding must cost clearly less than everything.
    assert!(half_weights * 100 < full_weights * 80, "0..15 used {half_weights} KiB vs {full_weights} KiB");
    assert!(tail_weights * 100 < full_weights * 80, "15..30 used {tail_weights} KiB vs {full_weights} KiB");
    Ok(())
}
