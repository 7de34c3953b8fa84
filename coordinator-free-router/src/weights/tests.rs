use super::*;
use shoal_model_shards::manifest::MANIFEST_FORMAT;

/// A manifest of `n` one-range layers of 10 bytes after a 16-byte header, an embedding and an
/// output norm (tied LM head); hashes are those of the given file bytes.
fn manifest_of(bytes: &[u8], n: u32) -> Manifest {
    let mut pieces = Vec::new();
    let mut add = |kind, off: u64, len: u64| {
        let hash = blake3::hash(&bytes[off as usize..(off + len) as usize]).to_hex().to_string();
        pieces.push(Piece { kind, ranges: vec![[off, len]], hash });
    };
    add(PieceKind::Header, 0, 16);
    add(PieceKind::Embedding, 16, 10);
    for i in 0..n {
        add(PieceKind::Layer(i), 26 + 10 * u64::from(i), 10);
    }
    add(PieceKind::OutputNorm, 26 + 10 * u64::from(n), 4);
    let m = Manifest { format: MANIFEST_FORMAT, file_size: bytes.len() as u64, n_layers: n, pieces };
    m.validate().unwrap();
    m
}

fn file_bytes(n: u32) -> Vec<u8> {
    (0..(30 + 10 * n)).map(|i| (i * 7 % 251) as u8).collect()
}

fn temp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-weights-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn holdings_say_what_is_held() {
    let m = manifest_of(&file_bytes(8), 8);
    let all: Vec<usize> = (0..m.pieces.len()).collect();
    let h = holdings(&m, &all);
    assert_eq!(h, Holdings::all(8));
    // A last span: header, layers 5..8, output (tied: the embedding is the LM head).
    let last = m.pieces_for_span(5..8);
    let h = holdings(&m, &last);
    assert_eq!(h.layers, vec![(5, 8)]);
    assert!(h.header && h.output && h.embedding);
    // Scattered layers: at most MAX_HELD_RANGES ranges, the longest kept.
    let layers = |v: &[u32]| v.iter().map(|&i| m.index_of(PieceKind::Layer(i)).unwrap()).collect::<Vec<_>>();
    let h = holdings(&m, &layers(&[0, 2, 3, 5, 7]));
    assert_eq!(h.layers, vec![(0, 1), (2, 4), (5, 6), (7, 8)]);
    assert!(!h.header && !h.embedding && !h.output);
    let mut many = layers(&[0, 2, 4, 6]);
    many.extend(layers(&[7]));
    assert_eq!(holdings(&m, &many).layers.len(), MAX_HELD_RANGES);
    // An announcement that says so is a provider of exactly those pieces.
    let a = Announcement {
        node: [1; 32],
        model: m.id(),
        n_layers: 8,
        start: 5,
        end: 8,
        state: crate::swarm::announce::PeerState::Serving,
        throughput: 1.0,
        load: 0,
        free_kv_bytes: 0,
        version: String::new(),
        seq: 1,
        issued_at_ms: 0,
        ttl_ms: 10_000,
        addrs: vec![],
        holds: holdings(&m, &last),
    };
    for (i, p) in m.pieces.iter().enumerate() {
        assert_eq!(announces(&a, p), last.contains(&i), "{:?}", p.kind);
    }
}

#[test]
fn piece_dir_records_only_written_pieces_and_survives_a_restart() {
    let data = temp("dir");
    let bytes = file_bytes(4);
    let m = manifest_of(&bytes, 4);
    let id = m.id();
    assert!(PieceDir::open(&data, &id).unwrap().is_none());
    let dir = PieceDir::create(&data, m.clone()).unwrap();
    assert_eq!(std::fs::metadata(dir.file()).unwrap().len(), bytes.len() as u64);
    let want = m.pieces_for_span(0..2);
    assert_eq!(dir.missing(&want), want);
    // A piece of the wrong size is refused and not recorded.
    assert!(dir.write_piece(want[1], &[0; 3]).is_err());
    for &i in &want[..2] {
        let [off, len] = m.pieces[i].ranges[0];
        dir.write_piece(i, &bytes[off as usize..(off + len) as usize]).unwrap();
    }
    drop(dir);
    // Reopened: the record and the bytes are still there; only the rest is missing.
    let dir = PieceDir::open(&data, &id).unwrap().unwrap();
    assert_eq!(dir.missing(&want), want[2..].to_vec());
    let on_disk = std::fs::read(dir.file()).unwrap();
    for &i in &want[..2] {
        let [off, len] = m.pieces[i].ranges[0];
        assert_eq!(on_disk[off as usize..(off + len) as usize], bytes[off as usize..(off + len) as usize]);
    }
    dir.forget(&want[..1]).unwrap();
    assert_eq!(PieceDir::open(&data, &id).unwrap().unwrap().missing(&want), {
        let mut v = vec![want[0]];
        v.extend(&want[2..]);
        v
    });
    // A manifest file that does not hash to its directory's id is refused.
    std::fs::write(PieceDir::path_for(&data, &id).join("manifest.json"), b"{}").unwrap();
    assert!(PieceDir::open(&data, &id).is_err());
    std::fs::remove_dir_all(&data).unwrap();
}

#[test]
fn unusable_data_dirs_are_clear_errors() {
    let m = manifest_of(&file_bytes(2), 2);
    // A data dir under a regular file cannot be created.
    let blocker = temp("blocker");
    std::fs::write(&blocker, b"a file").unwrap();
    let err = PieceDir::create(&blocker.join("data"), m.clone()).unwrap_err().to_string();
    assert!(err.contains("creating the data dir") && err.contains("blocker"), "{err}");
    std::fs::remove_file(&blocker).unwrap();
    // A manifest whose file would not fit the disk fails when sized, before anything is
    // fetched (sparse files make that check cheap only where the filesystem allows it).
    let mut huge = m.clone();
    huge.file_size = shoal_model_shards::manifest::MAX_FILE_BYTES + 1;
    assert!(huge.validate().is_err(), "absurd sizes never reach the disk");
}

/// A model file of a 4 KiB header, a 64 KiB embedding, `n` layers of `piece` bytes and a
/// 4 KiB output norm, filled from `seed`; and its manifest.
fn big_model(n: u32, piece: u64, seed: u8) -> (Vec<u8>, Manifest) {
    let sizes: Vec<(PieceKind, u64)> = [(PieceKind::Header, 4096), (PieceKind::Embedding, 65536)]
        .into_iter()
        .chain((0..n).map(|i| (PieceKind::Layer(i), piece)))
        .chain([(PieceKind::OutputNorm, 4096)])
        .collect();
    let total: u64 = sizes.iter().map(|s| s.1).sum();
    let bytes: Vec<u8> = (0..total).map(|i| (i.wrapping_mul(31) as u8) ^ seed).collect();
    let mut off = 0;
    let pieces = sizes
        .into_iter()
        .map(|(kind, len)| {
            let hash = blake3::hash(&bytes[off as usize..(off + len) as usize]).to_hex().to_string();
            let p = Piece { kind, ranges: vec![[off, len]], hash };
            off += len;
            p
        })
        .collect();
    let m = Manifest { format: MANIFEST_FORMAT, file_size: total, n_layers: n, pieces };
    m.validate().unwrap();
    (bytes, m)
}

fn write_all(dir: &PieceDir, bytes: &[u8]) {
    for (i, p) in dir.manifest().pieces.clone().iter().enumerate() {
        let [off, len] = p.ranges[0];
        dir.write_piece(i, &bytes[off as usize..(off + len) as usize]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn layer(m: &Manifest, i: u32) -> usize {
    m.index_of(PieceKind::Layer(i)).unwrap()
}

#[cfg(target_os = "linux")]
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn the_cache_budget_evicts_least_recently_used_pieces_never_kept_ones() {
    const MIB: u64 = 1 << 20;
    let data = temp("budget");
    let (old_bytes, old_m) = big_model(4, MIB, 0x55);
    let (bytes, m) = big_model(4, MIB, 0xaa);
    // Another model's pieces, written (used) first; then this model's.
    let old = PieceDir::create(&data, old_m.clone()).unwrap();
    write_all(&old, &old_bytes);
    drop(old);
    let dir = PieceDir::create(&data, m.clone()).unwrap();
    write_all(&dir, &bytes);
    let held = dir.held_bytes();
    assert_eq!(held, m.file_size);
    #[cfg(target_os = "linux")]
    let old_disk = disk_bytes(&PieceDir::open(&data, &old_m.id()).unwrap().unwrap().file());

    // Room for this model and half of the other's layers: the other's oldest pieces go
    // first (its header and embedding, then layers 0 and 1).
    let keep: BTreeSet<usize> = m.pieces_for_span(0..4).into_iter().collect();
    let budget = held + 2 * MIB + 8192;
    let evicted = make_room(&data, budget, &dir, &keep, 0).unwrap();
    let old_id = old_m.id();
    let want: Vec<([u8; 32], usize)> =
        [0, 1, layer(&old_m, 0), layer(&old_m, 1)].map(|i| (old_id, i)).to_vec();
    assert_eq!(evicted.pieces, want);
    assert_eq!(evicted.bytes, 4096 + 65536 + 2 * MIB);
    let old = PieceDir::open(&data, &old_id).unwrap().unwrap();
    assert_eq!(old.complete(), vec![layer(&old_m, 2), layer(&old_m, 3), layer(&old_m, 3) + 1]);
    assert_eq!(dir.complete().len(), m.pieces.len(), "this model's kept pieces stay");
    // The evicted bytes read as zeros and no longer take disk space.
    let on_disk = std::fs::read(old.file()).unwrap();
    let [off, len] = old_m.pieces[layer(&old_m, 0)].ranges[0];
    assert!(on_disk[off as usize..(off + len) as usize].iter().all(|&b| b == 0));
    #[cfg(target_os = "linux")]
    {
        let freed = old_disk - disk_bytes(&old.file());
        assert!(freed >= 2 * MIB, "only {freed} bytes of disk freed");
    }

    // Using layer 0 again makes layer 1 this model's least recently used layer: keeping the
    // span 2..4 (its header, embedding and norm too), a fetch of 1 MiB more evicts the other
    // model's last layers first, then layer 1, and layer 0 survives.
    dir.touch(&[layer(&m, 0)]).unwrap();
    let keep: BTreeSet<usize> = m.pieces_for_span(2..4).into_iter().collect();
    let evicted = make_room(&data, held, &dir, &keep, MIB).unwrap();
    let want: Vec<([u8; 32], usize)> = vec![
        (m.id(), layer(&m, 1)),
        (old_id, layer(&old_m, 2)),
        (old_id, layer(&old_m, 3)),
        (old_id, layer(&old_m, 3) + 1),
    ];
    let mut got = evicted.pieces.clone();
    got.sort();
    let mut want_sorted = want.clone();
    want_sorted.sort();
    assert_eq!(got, want_sorted);
    assert!(dir.missing(&[layer(&m, 0)]).is_empty(), "the recently used layer stays");
    // The record survives a restart.
    drop(dir);
    let dir = PieceDir::open(&data, &m.id()).unwrap().unwrap();
    assert_eq!(dir.missing(&[layer(&m, 1)]), vec![layer(&m, 1)]);

    // Pieces in use plus a fetch beyond the budget: a clear error, nothing evicted.
    let all: BTreeSet<usize> = (0..m.pieces.len()).collect();
    let before = dir.complete();
    let err = make_room(&data, 2 * MIB, &dir, &all, MIB).unwrap_err().to_string();
    assert!(err.contains("cache budget of 2.0 MiB") && err.contains("--cache-budget"), "{err}");
    assert_eq!(dir.complete(), before);
    std::fs::remove_dir_all(&data).unwrap();
}
