//! Weights from the swarm, in one process over real iroh endpoints on loopback, with the real
//! model (SmolLM2-135M Q4_1).
//!
//! Proves: a node fetches exactly a span's pieces from a seeder into a sparse copy, and that
//! copy computes the span's logits bit for bit; a seeder that goes away mid-fetch costs a
//! failover, not the fetch; a seeder that serves corrupted bytes under the right hash is caught
//! by verification, avoided, and the piece comes from an honest seeder; pieces no peer
//! provides come from a mirror (an HTTP copy of the file, read by byte ranges), only the
//! span's ranges, and a mirror whose bytes fail verification is refused.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use iroh::endpoint::{Connection, presets};
use iroh::protocol::{AcceptError, ProtocolHandler, Router};
use iroh::{Endpoint, RelayMode};
use shoal_coordinator_free_router::swarm::PeerId;
use shoal_coordinator_free_router::weights::{
    FetchConfig, FetchReport, Mirror, PieceDir, fetch_pieces, seed,
};
use shoal_model_shards::manifest::{Manifest, PieceKind};
use shoal_model_shards::{DType, Device, LogitsMode, Model, Shard, StageInput, StageOutput};
use shoal_worker::net::{Node, NodeOptions, peer_id};

fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.is_file(), "{} is missing: run `bash deploy/fetch-model.sh` first", p.display());
    p
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-weights-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

async fn seeder(path: &Path, manifest: &Manifest) -> Node {
    let node = Node::bind(NodeOptions::loopback()).await.expect("bind");
    let all: Vec<usize> = (0..manifest.pieces.len()).collect();
    let served = seed(&node, path, manifest, &all).await.expect("seed");
    assert_eq!(served, all, "every piece of an intact file is served");
    node
}

async fn fetch(
    node: &Node,
    dir: &Arc<PieceDir>,
    want: &[usize],
    providers: Vec<PeerId>,
    config: FetchConfig,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> FetchReport {
    fetch_pieces(node, dir.clone(), want, Arc::new(move |_| providers.clone()), config, Arc::new(progress))
        .await
        .expect("the fetch completes")
}

/// The sparse copy holds the file's exact bytes for `pieces`.
fn assert_pieces_equal(original: &[u8], copy: &Path, manifest: &Manifest, pieces: &[usize]) {
    let copy = std::fs::read(copy).expect("read the copy");
    assert_eq!(copy.len(), original.len());
    for &i in pieces {
        for &[off, len] in &manifest.pieces[i].ranges {
            let r = off as usize..(off + len) as usize;
            assert!(copy[r.clone()] == original[r], "{:?} differs", manifest.pieces[i].kind);
        }
    }
}

fn no_shuffle() -> FetchConfig {
    FetchConfig { shuffle: false, connect_timeout: Duration::from_secs(2), ..FetchConfig::default() }
}

#[test]
fn a_span_fetched_from_a_seeder_computes_what_the_file_computes() {
    let path = model_path();
    let manifest = Manifest::of_gguf(&path).expect("manifest");
    let data = temp_dir("span");
    runtime().block_on(async {
        let a = seeder(&path, &manifest).await;
        let b = Node::bind(NodeOptions::loopback()).await.expect("bind");
        b.add_peer_addr(a.addr());
        let dir = Arc::new(PieceDir::create(&data, manifest.clone()).expect("data dir"));
        let want = manifest.pieces_for_span(15..30);
        let report = fetch(&b, &dir, &want, vec![a.id()], FetchConfig::default(), |_, _| {}).await;
        assert_eq!(report.pieces, want.len());
        assert_eq!(report.bytes, manifest.bytes_of(&want));
        assert!(report.bytes < manifest.file_size, "{} of {}", report.bytes, manifest.file_size);
        assert!(report.corrupt_peers.is_empty() && report.failovers == 0, "{report:?}");
        eprintln!(
            "fetched layers 15..30: {} of {} bytes in {:.2?} ({:.0} MB/s)",
            report.bytes,
            manifest.file_size,
            report.elapsed,
            report.bytes as f64 / report.elapsed.as_secs_f64() / 1e6
        );
        let original = std::fs::read(&path).expect("read");
        assert_pieces_equal(&original, &dir.file(), &manifest, &want);
        // Nothing else was fetched: layer 0's piece is still a hole (SmolLM2's embedding is
        // also its LM head, so the last span has it).
        assert_eq!(
            dir.missing(&manifest.pieces_for_span(0..1)),
            vec![manifest.index_of(PieceKind::Layer(0)).expect("layer 0")]
        );
        // A second fetch of the same span has nothing to do.
        let again = fetch(&b, &dir, &want, vec![a.id()], FetchConfig::default(), |_, _| {}).await;
        assert_eq!((again.pieces, again.bytes), (0, 0));

        // The sparse copy computes the span's logits bit for bit.
        let whole = Model::open(&path).expect("model");
        let copy = Model::open(dir.file()).expect("the sparse copy opens");
        let first = Shard::load(&whole, 0..15, &Device::Cpu, DType::F32).expect("0..15");
        let from_file = Shard::load(&whole, 15..30, &Device::Cpu, DType::F32).expect("15..30");
        let from_copy = Shard::load(&copy, 15..30, &Device::Cpu, DType::F32).expect("15..30 from the copy");
        let tokens = vec![504u32, 3575, 282, 4649, 314, 2, 9, 1345];
        let StageOutput::Hidden(h) = first
            .forward(&mut first.new_cache(64), StageInput::Tokens(tokens), LogitsMode::All)
            .expect("0..15")
        else {
            panic!("0..15 returns hidden states")
        };
        let logits = |s: &Shard| match s
            .forward(&mut s.new_cache(64), StageInput::Hidden(h.clone()), LogitsMode::All)
            .expect("15..30")
        {
            StageOutput::Logits(l) => l.to_vec2::<f32>().expect("logits"),
            StageOutput::Hidden(_) => panic!("the last span returns logits"),
        };
        assert_eq!(logits(&from_copy), logits(&from_file));
        // Seeding the copy serves exactly its complete pieces.
        let c = Node::bind(NodeOptions::loopback()).await.expect("bind");
        let served = seed(&c, &dir.file(), &manifest, &dir.complete()).await.expect("seed the copy");
        assert_eq!(served, dir.complete());
        for n in [a, b, c] {
            n.shutdown().await;
        }
    });
    std::fs::remove_dir_all(&data).expect("clean up");
}

#[test]
fn a_seeder_lost_mid_fetch_costs_a_failover_not_the_fetch() {
    let path = model_path();
    let manifest = Manifest::of_gguf(&path).expect("manifest");
    let data = temp_dir("lost");
    runtime().block_on(async {
        let a = seeder(&path, &manifest).await;
        let c = seeder(&path, &manifest).await;
        let b = Node::bind(NodeOptions::loopback()).await.expect("bind");
        b.add_peer_addr(a.addr());
        b.add_peer_addr(c.addr());
        let dir = Arc::new(PieceDir::create(&data, manifest.clone()).expect("data dir"));
        let want: Vec<usize> = (0..manifest.pieces.len()).collect();
        // One piece at a time, A asked first: A goes away as soon as the first bytes arrive.
        let killed = Arc::new(AtomicBool::new(false));
        let (k, a2) = (killed.clone(), a.clone());
        let config = FetchConfig { concurrency: 1, ..no_shuffle() };
        let report = fetch(&b, &dir, &want, vec![a.id(), c.id()], config, move |done, total| {
            if done > 0 && !k.swap(true, Ordering::SeqCst) {
                assert!(done < total, "A is lost mid-fetch");
                let a2 = a2.clone();
                tokio::spawn(async move { a2.shutdown().await });
            }
        })
        .await;
        assert!(killed.load(Ordering::SeqCst));
        assert_eq!(report.pieces, want.len());
        assert!(report.failovers >= 1, "{report:?}");
        assert!(report.corrupt_peers.is_empty(), "{report:?}");
        assert_pieces_equal(&std::fs::read(&path).expect("read"), &dir.file(), &manifest, &want);
        eprintln!(
            "lost seeder: {} pieces, {} failovers, {:.2?}",
            report.pieces, report.failovers, report.elapsed
        );
        for n in [b, c] {
            n.shutdown().await;
        }
    });
    std::fs::remove_dir_all(&data).expect("clean up");
}

/// A seeder that answers every iroh-blobs request with the honest encoding of the blob with
/// one byte flipped: the right hash and tree, corrupted data. A test harness; nothing in the
/// shipped code can lie on request.
#[derive(Debug, Clone)]
struct Liar {
    honest: iroh_blobs::api::Store,
}

impl ProtocolHandler for Liar {
    async fn accept(&self, conn: Connection) -> Result<(), AcceptError> {
        while let Ok((mut send, mut recv)) = conn.accept_bi().await {
            let Ok(bytes) = recv.read_to_end(1 << 16).await else { break };
            let Some((&kind, body)) = bytes.split_first() else { break };
            assert_eq!(kind, 0, "a get request");
            let request: iroh_blobs::protocol::GetRequest =
                postcard::from_bytes(body).expect("a get request");
            let ranges = request.ranges.iter_non_empty_infinite().next().map(|(_, r)| r.clone());
            let Some(ranges) = ranges else { break };
            let mut encoded =
                self.honest.export_bao(request.hash, ranges).bao_to_vec().await.expect("honest encoding");
            let last = encoded.len() - 1;
            encoded[last] ^= 0x40;
            let _ = send.write_all(&encoded).await;
            let _ = send.finish();
        }
        Ok(())
    }
}

#[test]
fn a_seeder_serving_corrupted_bytes_is_caught_and_avoided() {
    let path = model_path();
    let manifest = Manifest::of_gguf(&path).expect("manifest");
    let data = temp_dir("liar");
    runtime().block_on(async {
        let honest = seeder(&path, &manifest).await;
        let endpoint = Endpoint::builder(presets::Minimal)
            .relay_mode(RelayMode::Disabled)
            .clear_ip_transports()
            .bind_addr("127.0.0.1:0".parse::<std::net::SocketAddr>().expect("addr"))
            .expect("bind addr")
            .bind()
            .await
            .expect("bind");
        let liar_id = peer_id(&endpoint.id());
        let liar_addr = {
            let mut a = iroh::EndpointAddr::new(endpoint.id());
            for s in endpoint.bound_sockets() {
                a.addrs.insert(iroh::TransportAddr::Ip(s));
            }
            a
        };
        let liar = Router::builder(endpoint)
            .accept(iroh_blobs::ALPN, Liar { honest: honest.blobs().clone() })
            .spawn();
        let b = Node::bind(NodeOptions::loopback()).await.expect("bind");
        b.add_peer_addr(honest.addr());
        b.add_peer_addr(liar_addr);
        let dir = Arc::new(PieceDir::create(&data, manifest.clone()).expect("data dir"));
        let layer = manifest.index_of(PieceKind::Layer(20)).expect("layer 20");
        let want = vec![layer, manifest.index_of(PieceKind::Layer(21)).expect("layer 21")];
        // The liar is asked first for every piece.
        let config = FetchConfig { concurrency: 1, ..no_shuffle() };
        let report = fetch(&b, &dir, &want, vec![liar_id, honest.id()], config, |_, _| {}).await;
        assert_eq!(report.corrupt_peers, vec![liar_id], "{report:?}");
        assert_eq!(report.failovers, 1, "caught once, then avoided: {report:?}");
        assert_eq!(report.pieces, 2);
        assert_pieces_equal(&std::fs::read(&path).expect("read"), &dir.file(), &manifest, &want);
        liar.shutdown().await.expect("liar shutdown");
        for n in [honest, b] {
            n.shutdown().await;
        }
    });
    std::fs::remove_dir_all(&data).expect("clean up");
}

/// A mirror reading `bytes` (with one byte flipped at `flip`), counting the bytes it sends.
fn mirror_of(bytes: Arc<Vec<u8>>, flip: Option<usize>, sent: Arc<std::sync::atomic::AtomicU64>) -> Mirror {
    Mirror {
        name: "test mirror".into(),
        read: Arc::new(move |off, len| {
            let (bytes, sent) = (bytes.clone(), sent.clone());
            Box::pin(async move {
                let r = off as usize..(off + len) as usize;
                let mut out = bytes.get(r.clone()).ok_or("past the end")?.to_vec();
                if let Some(at) = flip.filter(|at| r.contains(at)) {
                    out[at - r.start] ^= 1;
                }
                sent.fetch_add(len, Ordering::Relaxed);
                Ok(out.into())
            })
        }),
    }
}

#[test]
fn pieces_no_peer_provides_come_from_the_mirror_verified() {
    let path = model_path();
    let manifest = Manifest::of_gguf(&path).expect("manifest");
    let original = Arc::new(std::fs::read(&path).expect("read the model"));
    runtime().block_on(async {
        let node = Node::bind(NodeOptions::loopback()).await.expect("bind");
        let want = manifest.pieces_for_span(20..30);
        let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));

        // A mirror that flips one byte of layer 25: refused, and that piece is not recorded.
        let data = temp_dir("mirror-bad");
        let dir = Arc::new(PieceDir::create(&data, manifest.clone()).expect("piece dir"));
        let layer25 = manifest.index_of(PieceKind::Layer(25)).expect("layer 25");
        let flip = manifest.pieces[layer25].ranges[0][0] as usize + 1000;
        let config = FetchConfig {
            mirror: Some(mirror_of(original.clone(), Some(flip), sent.clone())),
            concurrency: 1,
            ..no_shuffle()
        };
        let err =
            fetch_pieces(&node, dir.clone(), &want, Arc::new(|_| Vec::new()), config, Arc::new(|_, _| {}))
                .await
                .expect_err("a lying mirror fails the fetch")
                .to_string();
        assert!(err.contains("layer 25") && err.contains("fail verification"), "{err}");
        assert_eq!(dir.missing(&[layer25]), vec![layer25], "the bad piece is not recorded");
        let _ = std::fs::remove_dir_all(&data);

        // An honest mirror: every piece of the span, bit for bit, and nothing else asked for.
        sent.store(0, Ordering::Relaxed);
        let data = temp_dir("mirror");
        let dir = Arc::new(PieceDir::create(&data, manifest.clone()).expect("piece dir"));
        let config =
            FetchConfig { mirror: Some(mirror_of(original.clone(), None, sent.clone())), ..no_shuffle() };
        let report = fetch(&node, &dir, &want, Vec::new(), config, |_, _| {}).await;
        assert_eq!(report.mirror_pieces, want.len());
        assert!(dir.missing(&want).is_empty());
        assert_pieces_equal(&original, &dir.file(), &manifest, &want);
        let span_bytes = manifest.bytes_of(&want);
        assert_eq!(sent.load(Ordering::Relaxed), span_bytes, "only the span's byte ranges are read");
        eprintln!("mirror: {span_bytes} of {} bytes read", manifest.file_size);
        node.shutdown().await;
        let _ = std::fs::remove_dir_all(&data);
    });
}
