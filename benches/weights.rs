//! Weights from the swarm, in one run: `cargo bench --profile dev --bench weights`.
//!
//! - **Manifest hashing**: `Manifest::of_gguf` (read the tensor table, BLAKE3 every piece, in
//!   parallel over pieces) on the default model and on a synthetic GGUF of `BENCH_GIB` GiB
//!   (default 1; 32 layers of f32 tensors, written to a temp dir first), as MB/s.
//! - **Seeding**: adding every piece of the synthetic file to a node's blob store (zero-copy
//!   views of the mapped file; iroh-blobs hashes each piece again to build its BLAKE3 tree).
//! - **Fetch over loopback**: a seeder node serves every piece of the synthetic file; a second
//!   node fetches them all into an empty data dir (BLAKE3-verified streaming over iroh QUIC,
//!   written into the sparse copy and synced), as MB/s, against a plain `std::fs::copy` of the
//!   same file, measured back to back.
//!
//! Prints a table and one JSON line:
//! `{"hash_mb_s_model", "hash_mb_s_synthetic", "seed_mb_s", "fetch_mb_s", "copy_mb_s",
//! "fetch_over_copy"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use shoal_coordinator_free_router::weights::{FetchConfig, PieceDir, fetch_pieces, seed};
use shoal_model_shards::manifest::Manifest;
use shoal_worker::net::{Node, NodeOptions};

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// A GGUF of about `bytes` bytes: `layers` layers of f32 tensors with distinct contents.
fn synthetic(path: &Path, bytes: u64, layers: usize) {
    let per_tensor = (bytes / layers as u64 / 4) as usize;
    let tensors: Vec<(String, QTensor)> = (0..layers)
        .map(|i| {
            let v: Vec<f32> = (0..per_tensor).map(|j| (i * 31 + j) as f32).collect();
            let t = candle_core::Tensor::from_vec(v, per_tensor, &candle_core::Device::Cpu).expect("tensor");
            (format!("blk.{i}.ffn_up.weight"), QTensor::quantize(&t, GgmlDType::F32).expect("f32"))
        })
        .collect();
    use gguf_file::Value as V;
    let meta = [("general.architecture", V::String("llama".into()))];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    gguf_file::write(&mut f, &meta_refs, &refs).expect("write the GGUF");
}

fn main() {
    let gib: f64 = std::env::var("BENCH_GIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let model = PathBuf::from(
        std::env::var("SHOAL_MODEL").unwrap_or_else(|_| "models/SmolLM2-135M-Instruct.Q4_1.gguf".into()),
    );
    let dir = std::env::temp_dir().join(format!("shoal-bench-weights-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");

    let hash = |path: &Path| -> (Manifest, f64) {
        let size = std::fs::metadata(path).expect("size").len();
        // Warm the page cache, then time the hashing alone.
        let _ = Manifest::of_gguf(path).expect("manifest");
        let t = Instant::now();
        let m = Manifest::of_gguf(path).expect("manifest");
        (m, mb_s(size, t.elapsed().as_secs_f64()))
    };
    let (_, hash_model) = hash(&model);
    let big = dir.join("synthetic.gguf");
    synthetic(&big, (gib * (1u64 << 30) as f64) as u64, 32);
    let (manifest, hash_big) = hash(&big);
    let size = manifest.file_size;

    let t = Instant::now();
    std::fs::copy(&big, dir.join("copy.gguf")).expect("copy");
    std::fs::File::open(dir.join("copy.gguf")).and_then(|f| f.sync_all()).expect("sync");
    let copy = mb_s(size, t.elapsed().as_secs_f64());
    std::fs::remove_file(dir.join("copy.gguf")).expect("remove the copy");

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("rt");
    let (seeded, fetch) = rt.block_on(async {
        let seeder = Node::bind(NodeOptions::loopback()).await.expect("bind");
        let all: Vec<usize> = (0..manifest.pieces.len()).collect();
        let t = Instant::now();
        seed(&seeder, &big, &manifest, &all).await.expect("seed");
        let seeded = mb_s(size, t.elapsed().as_secs_f64());
        let fetcher = Node::bind(NodeOptions::loopback()).await.expect("bind");
        fetcher.add_peer_addr(seeder.addr());
        let pieces = Arc::new(PieceDir::create(&dir.join("data"), manifest.clone()).expect("data dir"));
        let id = seeder.id();
        let t = Instant::now();
        let report = fetch_pieces(
            &fetcher,
            pieces,
            &all,
            Arc::new(move |_| vec![id]),
            FetchConfig::default(),
            Arc::new(|_, _| {}),
        )
        .await
        .expect("fetch");
        assert_eq!(report.bytes, size);
        let r = mb_s(size, t.elapsed().as_secs_f64());
        seeder.shutdown().await;
        fetcher.shutdown().await;
        (seeded, r)
    });
    let _ = std::fs::remove_dir_all(&dir);

    println!("| what | MB/s |");
    println!("| --- | --- |");
    println!("| manifest hashing, {} | {hash_model:.0} |", model.display());
    println!("| manifest hashing, synthetic {gib} GiB | {hash_big:.0} |");
    println!("| seeding (blob store trees), synthetic {gib} GiB | {seeded:.0} |");
    println!("| fetch over loopback (verified, written, synced) | {fetch:.0} |");
    println!("| plain file copy (synced) | {copy:.0} |");
    println!("fetch / copy: {:.2}x", fetch / copy);
    println!(
        "{}",
        serde_json::json!({
            "hash_mb_s_model": hash_model,
            "hash_mb_s_synthetic": hash_big,
            "seed_mb_s": seeded,
            "fetch_mb_s": fetch,
            "copy_mb_s": copy,
            "fetch_over_copy": fetch / copy,
        })
    );
}
