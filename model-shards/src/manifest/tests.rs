use super::*;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

/// Writes a small GGUF whose tensors are in an order that interleaves kinds (the final norm
/// between two layers), so a piece can need two ranges.
fn write_test_gguf(path: &Path) {
    let t = |n: usize, v: f32| {
        let data: Vec<f32> = (0..n).map(|i| v + i as f32).collect();
        QTensor::quantize(&Tensor::from_vec(data, n, &Device::Cpu).unwrap(), GgmlDType::F32).unwrap()
    };
    let tensors = [
        ("token_embd.weight", t(64, 1.0)),
        ("blk.0.attn_norm.weight", t(16, 2.0)),
        ("blk.0.ffn_norm.weight", t(16, 3.0)),
        ("output_norm.weight", t(16, 4.0)),
        ("blk.1.attn_norm.weight", t(16, 5.0)),
        ("rope_freqs.weight", t(8, 6.0)),
        ("blk.1.ffn_norm.weight", t(16, 7.0)),
        ("blk.0.attn_q.weight", t(32, 8.0)),
    ];
    use gguf_file::Value as V;
    let meta = [("general.architecture", V::String("llama".into())), ("llama.block_count", V::U32(2))];
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
    let mut f = File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-manifest-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join("m.gguf")
}

#[test]
fn pieces_cover_every_tensor_and_hash_their_bytes() {
    let path = temp("cover");
    write_test_gguf(&path);
    let m = Manifest::of_gguf(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(m.file_size, bytes.len() as u64);
    assert_eq!(m.n_layers, 2);
    assert_eq!(m.pieces[0].kind, PieceKind::Header);
    let kinds: Vec<PieceKind> = m.pieces.iter().map(|p| p.kind).collect();
    for k in [
        PieceKind::Embedding,
        PieceKind::Layer(0),
        PieceKind::Layer(1),
        PieceKind::OutputNorm,
        PieceKind::Globals,
    ] {
        assert!(kinds.contains(&k), "{k:?} in {kinds:?}");
    }
    assert!(!kinds.contains(&PieceKind::LmHead), "tied: no LM head piece");
    // Layer 0's tensors sit on both sides of the final norm: two ranges.
    let l0 = &m.pieces[m.index_of(PieceKind::Layer(0)).unwrap()];
    assert_eq!(l0.ranges.len(), 2, "{l0:?}");
    for p in &m.pieces {
        let mut h = blake3::Hasher::new();
        for &[off, len] in &p.ranges {
            h.update(&bytes[off as usize..(off + len) as usize]);
        }
        assert_eq!(h.finalize().to_hex().to_string(), p.hash, "{:?}", p.kind);
    }
    // Every tensor's bytes lie in exactly one piece.
    let content = gguf_file::Content::read(&mut File::open(&path).unwrap()).unwrap();
    for (name, info) in &content.tensor_infos {
        let start = content.tensor_data_offset + info.offset;
        let owners =
            m.pieces.iter().filter(|p| p.ranges.iter().any(|&[o, l]| o <= start && start < o + l)).count();
        assert_eq!(owners, 1, "{name}");
    }
    // Stable: the same file gives the same id; the bytes round-trip with the id checked.
    let again = Manifest::of_gguf(&path).unwrap();
    assert_eq!(m.id(), again.id());
    assert_eq!(Manifest::from_bytes(&m.to_bytes(), Some(m.id())).unwrap(), m);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn one_changed_byte_changes_the_id() {
    let path = temp("flip");
    write_test_gguf(&path);
    let m = Manifest::of_gguf(&path).unwrap();
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let m2 = Manifest::of_gguf(&path).unwrap();
    assert_ne!(m.id(), m2.id());
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn spans_need_their_pieces() {
    let path = temp("span");
    write_test_gguf(&path);
    let m = Manifest::of_gguf(&path).unwrap();
    let kinds = |span: Range<usize>| -> Vec<PieceKind> {
        m.pieces_for_span(span).into_iter().map(|i| m.pieces[i].kind).collect()
    };
    let first = kinds(0..1);
    assert!(first.contains(&PieceKind::Embedding) && first.contains(&PieceKind::Layer(0)));
    assert!(!first.contains(&PieceKind::Layer(1)) && !first.contains(&PieceKind::OutputNorm));
    let last = kinds(1..2);
    assert!(last.contains(&PieceKind::OutputNorm) && last.contains(&PieceKind::Layer(1)));
    assert!(last.contains(&PieceKind::Embedding), "tied embeddings serve as the LM head");
    assert!(!last.contains(&PieceKind::Layer(0)));
    let origin = kinds(0..0);
    assert_eq!(origin, vec![PieceKind::Header, PieceKind::Globals]);
    assert!(m.bytes_of(&m.pieces_for_span(0..2)) <= m.file_size);
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
}

#[test]
fn hostile_manifests_are_refused() {
    let path = temp("hostile");
    write_test_gguf(&path);
    let good = Manifest::of_gguf(&path).unwrap();
    std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    let refused = |m: &Manifest, what: &str| {
        let err = Manifest::from_bytes(&m.to_bytes(), None).unwrap_err().to_string();
        assert!(err.contains(what), "{what}: {err}");
    };
    let mut m = good.clone();
    m.file_size = u64::MAX;
    refused(&m, "beyond");
    let mut m = good.clone();
    m.pieces[1].ranges[0] = [u64::MAX - 1, 10];
    refused(&m, "beyond the file");
    let mut m = good.clone();
    let r = m.pieces[1].ranges[0];
    m.pieces[2].ranges[0] = [r[0], 4];
    refused(&m, "overlap");
    let mut m = good.clone();
    m.pieces.retain(|p| p.kind != PieceKind::Layer(1));
    refused(&m, "no piece for layer 1");
    let mut m = good.clone();
    m.pieces[1].hash = "zz".into();
    refused(&m, "hex");
    let mut m = good.clone();
    m.format = 9;
    refused(&m, "format");
    let mut m = good.clone();
    m.pieces.swap(0, 1);
    refused(&m, "header");
    // Bytes that do not hash to the id asked for, garbage, and oversized input.
    let err = Manifest::from_bytes(&good.to_bytes(), Some([0; 32])).unwrap_err().to_string();
    assert!(err.contains("do not hash"), "{err}");
    assert!(Manifest::from_bytes(b"{not json", None).is_err());
    assert!(Manifest::from_bytes(&vec![b' '; MAX_MANIFEST_BYTES + 1], None).is_err());
}
