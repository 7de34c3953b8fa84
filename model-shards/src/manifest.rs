//! Content-addressed models: a GGUF file described as a manifest of pieces.
//!
//! A [`Manifest`] cuts a GGUF file into pieces that peers can fetch separately: the header
//! (magic, metadata with the tokenizer, chat template and hyperparameters, and the tensor
//! table), one piece per transformer layer (every `blk.N.*` tensor), the token embedding, the
//! final norm, the LM head, and the remaining global tensors (e.g. Llama 3's `rope_freqs`).
//! Each piece is one or more byte ranges of the file, and its hash is the BLAKE3 hash of those
//! bytes in order (the hash iroh-blobs gives the same bytes). The manifest's own bytes are
//! canonical JSON, and their BLAKE3 hash is the model's id: two peers that announce the same
//! id provably hold the same bytes.
//!
//! A node that holds only some pieces keeps them in a sparse copy of the file, every piece at
//! its own offset, so [`crate::Model::open`] reads the header and [`crate::Shard::load`] reads
//! the span's tensors as from the whole file; bytes outside every piece are padding.
//!
//! Parsing a manifest from a peer ([`Manifest::from_bytes`]) checks everything before it is
//! used: the format, that pieces lie inside the file and do not overlap, that every layer has
//! exactly one piece, and sizes below [`MAX_FILE_BYTES`].

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::Path;

use candle_core::quantized::gguf_file;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Format number of the manifest's JSON.
pub const MANIFEST_FORMAT: u32 = 1;
/// Largest model file a manifest may describe (64 TiB): larger is taken as a hostile manifest.
pub const MAX_FILE_BYTES: u64 = 1 << 46;
/// Largest encoded manifest accepted from a peer.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most pieces in a manifest (layers, header and globals).
pub const MAX_PIECES: usize = 4096 + 8;
/// Most byte ranges in one piece.
pub const MAX_RANGES: usize = 4096;

/// What a piece holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PieceKind {
    /// The file's start up to its tensor data: metadata and the tensor table.
    Header,
    /// `token_embd.weight`.
    Embedding,
    /// Every `blk.N.*` tensor of layer N.
    Layer(u32),
    /// `output_norm.weight`.
    OutputNorm,
    /// `output.weight` (absent when the embedding is tied).
    LmHead,
    /// Every other tensor (small model-wide tensors such as `rope_freqs.weight`).
    Globals,
}

/// One piece: byte ranges of the file and the BLAKE3 hash of their concatenation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// What it holds.
    pub kind: PieceKind,
    /// `[offset, length]` pairs, in file order, not overlapping.
    pub ranges: Vec<[u64; 2]>,
    /// BLAKE3 of the ranges' bytes in order, as 64 hex digits.
    pub hash: String,
}

impl Piece {
    /// Bytes in the piece.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|r| r[1]).sum()
    }

    /// Whether the piece has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The hash's 32 bytes.
    pub fn hash_bytes(&self) -> Result<[u8; 32]> {
        decode_hex32(&self.hash)
            .ok_or_else(|| bad(format!("piece hash {:?} is not 64 hex digits", self.hash)))
    }
}

/// A model file as pieces. See the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: u32,
    /// Size of the whole file.
    pub file_size: u64,
    /// Transformer layers of the model.
    pub n_layers: u32,
    /// The pieces: the header first, then the others in file order.
    pub pieces: Vec<Piece>,
}

fn bad(reason: impl Into<String>) -> Error {
    Error::Manifest(reason.into())
}

impl Manifest {
    /// Computes the manifest of a GGUF file: reads its tensor table, groups the tensors into
    /// pieces and hashes every piece (in parallel over pieces; about the speed of reading the
    /// file once).
    pub fn of_gguf(path: &Path) -> Result<Self> {
        let io = |source| Error::Io { path: path.to_path_buf(), source };
        let file = File::open(path).map_err(io)?;
        let file_size = file.metadata().map_err(io)?.len();
        // Buffered: the metadata is read in many small pieces (a vocabulary of tens of
        // thousands of strings).
        let mut reader = std::io::BufReader::with_capacity(1 << 20, &file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::UnknownFormat {
            path: path.to_path_buf(),
            reason: format!("not a readable GGUF file: {}", e.to_string().lines().next().unwrap_or("")),
        })?;
        let layout = Self::layout(&content, file_size)?;
        // SAFETY: mapped read-only; like every model loader we rely on nobody truncating a
        // model file while it is read (a truncation shows up as a SIGBUS, not wrong bytes).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let hashes: Vec<String> = layout
            .par_iter()
            .map(|(_, ranges)| {
                let mut h = blake3::Hasher::new();
                for &[off, len] in ranges {
                    h.update(&map[off as usize..(off + len) as usize]);
                }
                h.finalize().to_hex().to_string()
            })
            .collect();
        let n_layers = layout
            .iter()
            .filter_map(|(k, _)| match k {
                PieceKind::Layer(i) => Some(i + 1),
                _ => None,
            })
            .max()
            .unwrap_or(0);
        let pieces = layout
            .into_iter()
            .zip(hashes)
            .map(|((kind, ranges), hash)| Piece { kind, ranges, hash })
            .collect();
        let manifest = Self { format: MANIFEST_FORMAT, file_size, n_layers, pieces };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Groups the tensors of a GGUF file into pieces (unhashed): `(kind, ranges)`, the header
    /// first. Consecutive tensors of one kind form one range, padding between them included.
    fn layout(content: &gguf_file::Content, file_size: u64) -> Result<Vec<(PieceKind, Vec<[u64; 2]>)>> {
        let base = content.tensor_data_offset;
        let mut tensors: Vec<(u64, u64, PieceKind)> = Vec::with_capacity(content.tensor_infos.len());
        for (name, info) in &content.tensor_infos {
            let dtype = info.ggml_dtype;
            let len = (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
            let start = base
                .checked_add(info.offset)
                .filter(|s| s.checked_add(len).is_some_and(|e| e <= file_size))
                .ok_or_else(|| bad(format!("tensor {name} lies outside the file")))?;
            tensors.push((start, len, kind_of(name)));
        }
        tensors.sort_by_key(|t| (t.0, t.1));
        let mut groups: BTreeMap<PieceKind, Vec<[u64; 2]>> = BTreeMap::new();
        groups.insert(PieceKind::Header, vec![[0, base]]);
        let mut last: Option<PieceKind> = None;
        for (start, len, kind) in tensors {
            let ranges = groups.entry(kind).or_default();
            match ranges.last_mut() {
                // The previous tensor in the file was of this kind: extend its range over the
                // padding between them.
                Some(r) if last == Some(kind) && start >= r[0] + r[1] => r[1] = start + len - r[0],
                _ => ranges.push([start, len]),
            }
            last = Some(kind);
        }
        let mut out: Vec<_> = groups.into_iter().collect();
        // The header first, then file order.
        out.sort_by_key(|(k, r)| (*k != PieceKind::Header, r.first().map_or(0, |r| r[0])));
        Ok(out)
    }

    /// The canonical bytes (JSON) whose hash is the model id.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain structs of numbers and strings cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The model id: BLAKE3 of [`Manifest::to_bytes`].
    pub fn id(&self) -> [u8; 32] {
        *blake3::hash(&self.to_bytes()).as_bytes()
    }

    /// Parses and checks a manifest received from a peer; `expected_id` is the id it was
    /// asked for (the bytes must hash to it).
    pub fn from_bytes(bytes: &[u8], expected_id: Option<[u8; 32]>) -> Result<Self> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(bad(format!("{} bytes, more than the {MAX_MANIFEST_BYTES} allowed", bytes.len())));
        }
        if let Some(id) = expected_id
            && *blake3::hash(bytes).as_bytes() != id
        {
            return Err(bad("its bytes do not hash to the model id"));
        }
        let m: Self = serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        m.validate()?;
        Ok(m)
    }

    /// Checks the invariants of the module docs.
    pub fn validate(&self) -> Result<()> {
        if self.format != MANIFEST_FORMAT {
            return Err(bad(format!("unknown manifest format {}", self.format)));
        }
        if self.file_size > MAX_FILE_BYTES {
            return Err(bad(format!(
                "a file of {} bytes is beyond the {MAX_FILE_BYTES} allowed",
                self.file_size
            )));
        }
        if self.n_layers == 0 || self.n_layers > 4096 {
            return Err(bad(format!("{} layers", self.n_layers)));
        }
        if self.pieces.len() > MAX_PIECES {
            return Err(bad(format!("{} pieces, more than {MAX_PIECES}", self.pieces.len())));
        }
        if self.pieces.first().map(|p| p.kind) != Some(PieceKind::Header) {
            return Err(bad("the first piece is not the header"));
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut ranges: Vec<[u64; 2]> = Vec::new();
        for p in &self.pieces {
            if !seen.insert(p.kind) {
                return Err(bad(format!("two pieces of kind {:?}", p.kind)));
            }
            if let PieceKind::Layer(i) = p.kind
                && i >= self.n_layers
            {
                return Err(bad(format!("a piece for layer {i} of {}", self.n_layers)));
            }
            if p.ranges.is_empty() || p.ranges.len() > MAX_RANGES {
                return Err(bad(format!("piece {:?} has {} ranges", p.kind, p.ranges.len())));
            }
            p.hash_bytes()?;
            for &[off, len] in &p.ranges {
                if off.checked_add(len).is_none_or(|end| end > self.file_size) {
                    return Err(bad(format!(
                        "piece {:?} reaches beyond the file's {} bytes",
                        p.kind, self.file_size
                    )));
                }
                ranges.push([off, len]);
            }
        }
        if self.pieces[0].ranges != [[0, self.pieces[0].len()]] {
            return Err(bad("the header does not start the file"));
        }
        for i in 0..self.n_layers {
            if !seen.contains(&PieceKind::Layer(i)) {
                return Err(bad(format!("no piece for layer {i}")));
            }
        }
        ranges.sort_unstable();
        if ranges.windows(2).any(|w| w[0][0] + w[0][1] > w[1][0]) {
            return Err(bad("pieces overlap"));
        }
        Ok(())
    }

    /// Index of the piece of `kind`.
    pub fn index_of(&self, kind: PieceKind) -> Option<usize> {
        self.pieces.iter().position(|p| p.kind == kind)
    }

    /// The pieces a node needs to run layers `span` (with `span = 0..0`, an origin that only
    /// tokenizes: the header and the globals): the header, the globals, the span's layers,
    /// the embedding on the first span, the final norm and LM head on the last (the embedding
    /// too when it doubles as the LM head).
    pub fn pieces_for_span(&self, span: Range<usize>) -> Vec<usize> {
        let n = self.n_layers as usize;
        let tied = self.index_of(PieceKind::LmHead).is_none();
        self.pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| match p.kind {
                PieceKind::Header | PieceKind::Globals => true,
                PieceKind::Layer(i) => span.contains(&(i as usize)),
                PieceKind::Embedding => {
                    (span.start == 0 && !span.is_empty()) || (tied && span.end == n && !span.is_empty())
                }
                PieceKind::OutputNorm | PieceKind::LmHead => span.end == n && !span.is_empty(),
            })
            .map(|(i, _)| i)
            .collect()
    }

    /// Bytes of the given pieces.
    pub fn bytes_of(&self, pieces: &[usize]) -> u64 {
        pieces.iter().filter_map(|&i| self.pieces.get(i)).map(Piece::len).sum()
    }
}

fn kind_of(name: &str) -> PieceKind {
    if let Some(rest) = name.strip_prefix("blk.")
        && let Some(i) = rest.split('.').next().and_then(|i| i.parse::<u32>().ok())
    {
        return PieceKind::Layer(i);
    }
    match name {
        "token_embd.weight" => PieceKind::Embedding,
        "output_norm.weight" | "output_norm.bias" => PieceKind::OutputNorm,
        "output.weight" | "output.bias" => PieceKind::LmHead,
        _ => PieceKind::Globals,
    }
}

fn decode_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
