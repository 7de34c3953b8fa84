//! Opening a model: format detection, the validated spec, weights, tokenizer and chat template.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::gguf_file;

use crate::chat_template::ChatTemplate;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::spec::{HfConfig, ModelSpec};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

/// The on-disk format of a model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// One GGUF file (quantized or float weights, tokenizer and chat template in metadata).
    Gguf,
    /// A Hugging Face directory: `config.json`, `*.safetensors` (with
    /// `model.safetensors.index.json` when sharded), `tokenizer.json`, `tokenizer_config.json`.
    HuggingFace,
}

/// An opened model: its spec and access to its weights. Opening reads only headers and
/// configuration; [`crate::Shard::load`] reads the weights of a span.
pub struct Model {
    path: PathBuf,
    format: ModelFormat,
    spec: ModelSpec,
    weights: Weights,
    gguf: Option<Arc<gguf_file::Content>>,
    hf_config: Option<HfConfig>,
}

impl Model {
    /// Opens a `.gguf` file or a Hugging Face model directory.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            Self::open_hf(path)
        } else if path.is_file() {
            Self::open_gguf(path)
        } else {
            Err(Error::Io { path, source: std::io::Error::from(std::io::ErrorKind::NotFound) })
        }
    }

    fn open_gguf(path: PathBuf) -> Result<Self> {
        let file = File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
        // Buffered: the metadata comes in many small reads (tens of thousands of vocabulary
        // strings).
        let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
        let content = gguf_file::Content::read(&mut reader).map_err(|e| Error::UnknownFormat {
            path: path.clone(),
            reason: format!("not a readable GGUF file: {}", first_line(&e.to_string())),
        })?;
        let content = Arc::new(content);
        let spec = ModelSpec::from_gguf(&content)?;
        let weights = Weights::gguf(&path, content.clone())?;
        Ok(Self { path, format: ModelFormat::Gguf, spec, weights, gguf: Some(content), hf_config: None })
    }

    fn open_hf(dir: PathBuf) -> Result<Self> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(Error::UnknownFormat {
                path: dir,
                reason: "the directory has no config.json".into(),
            });
        }
        let hf_config: HfConfig = read_json(&config_path)?;
        let spec = ModelSpec::from_hf_config(&hf_config)?;
        let files = safetensors_files(&dir)?;
        let weights = Weights::safetensors(&files, &spec)?;
        Ok(Self {
            path: dir,
            format: ModelFormat::HuggingFace,
            spec,
            weights,
            gguf: None,
            hf_config: Some(hf_config),
        })
    }

    /// Where the model was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model's format.
    pub fn format(&self) -> &ModelFormat {
        &self.format
    }

    /// The validated spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub(crate) fn weights(&self) -> &Weights {
        &self.weights
    }

    /// GGUF metadata, for GGUF models.
    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        self.gguf.as_deref()
    }

    /// Loads the tokenizer: rebuilt from GGUF metadata, or the directory's `tokenizer.json`.
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        match (&self.gguf, &self.format) {
            (Some(content), _) => Ok(Tokenizer::from_gguf(content)?),
            (None, _) => Ok(Tokenizer::from_hf_dir(&self.path)?),
        }
    }

    /// The chat template, if the model has one.
    pub fn chat_template(&self) -> Result<Option<ChatTemplate>> {
        match &self.gguf {
            Some(content) => Ok(ChatTemplate::from_gguf(content)?),
            None => Ok(ChatTemplate::from_hf_dir(&self.path)?),
        }
    }

    /// The model's identity: a BLAKE3 hash of everything that defines it, so two
    /// quantizations or fine-tunes of one architecture never share an id. For a GGUF file,
    /// the id of its [`Manifest`] (which hashes every piece); for a directory, a hash of
    /// `config.json`, the tokenizer files and every safetensors file. Reads every byte once
    /// (about 0.1 s for a 100 MB file); call it once per process.
    pub fn model_id(&self) -> Result<[u8; 32]> {
        let mut hasher = blake3::Hasher::new();
        let files: Vec<PathBuf> = match self.format {
            ModelFormat::Gguf => return Ok(Manifest::of_gguf(&self.path)?.id()),
            ModelFormat::HuggingFace => {
                let mut v = vec![self.path.join("config.json")];
                for name in ["tokenizer.json", "tokenizer_config.json"] {
                    let p = self.path.join(name);
                    if p.is_file() {
                        v.push(p);
                    }
                }
                v.extend(safetensors_files(&self.path)?);
                v
            }
        };
        for path in files {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            let file = File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
            let len = file.metadata().map_err(|source| Error::Io { path: path.clone(), source })?.len();
            hasher.update(&len.to_le_bytes());
            hasher
                .update_reader(std::io::BufReader::with_capacity(1 << 20, file))
                .map_err(|source| Error::Io { path: path.clone(), source })?;
        }
        Ok(*hasher.finalize().as_bytes())
    }

    /// Bytes one transformer layer takes once loaded, the largest over the layers: exact
    /// tensor sizes for GGUF (quantized weights stay quantized), and for Hugging Face weights
    /// (loaded as f32) four bytes per parameter. Used to size a span to a memory budget.
    pub fn layer_bytes(&self) -> u64 {
        if let Some(content) = &self.gguf {
            let mut per_layer = vec![0u64; self.spec.n_layers];
            for (name, info) in &content.tensor_infos {
                let Some(rest) = name.strip_prefix("blk.") else { continue };
                let Some(layer) = rest.split('.').next().and_then(|i| i.parse::<usize>().ok()) else {
                    continue;
                };
                let dtype = info.ggml_dtype;
                let bytes = info.shape.elem_count() / dtype.block_size() * dtype.type_size();
                if let Some(slot) = per_layer.get_mut(layer) {
                    *slot += bytes as u64;
                }
            }
            return per_layer.into_iter().max().unwrap_or(0);
        }
        let s = &self.spec;
        let q = s.n_heads * s.head_dim;
        let kv = s.n_kv_heads * s.head_dim;
        let ffn = match &s.moe {
            Some(m) => m.n_experts * (3 * s.hidden_size * m.expert_intermediate_size + s.hidden_size),
            None => 3 * s.hidden_size * s.intermediate_size,
        };
        let params = s.hidden_size * (q + 2 * kv) + q * s.hidden_size + ffn + 4 * s.hidden_size;
        params as u64 * 4
    }

    /// End-of-generation ids declared by `config.json` (Hugging Face models), in addition to
    /// the tokenizer's.
    pub fn config_eos_ids(&self) -> Vec<u32> {
        self.hf_config.as_ref().and_then(|c| c.eos_token_id.as_ref()).map(|e| e.to_vec()).unwrap_or_default()
    }
}

/// The first line of an error message (candle appends a backtrace to some).
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    serde_json::from_slice(&bytes).map_err(|source| Error::Json { path: path.to_path_buf(), source })
}

/// The safetensors files of a directory: those named by the index when there is one,
/// otherwise every `*.safetensors` file.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let index_path = dir.join("model.safetensors.index.json");
    let files: Vec<PathBuf> = if index_path.is_file() {
        let index: Index = read_json(&index_path)?;
        let mut names: Vec<&String> = index.weight_map.values().collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        let entries =
            std::fs::read_dir(dir).map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
        let mut v = Vec::new();
        for e in entries {
            let e = e.map_err(|source| Error::Io { path: dir.to_path_buf(), source })?;
            let p = e.path();
            if p.extension().is_some_and(|x| x == "safetensors") {
                v.push(p);
            }
        }
        v.sort();
        v
    };
    if files.is_empty() {
        return Err(Error::UnknownFormat {
            path: dir.to_path_buf(),
            reason: "the directory has no *.safetensors files".into(),
        });
    }
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        return Err(Error::Io {
            path: missing.clone(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        });
    }
    Ok(files)
}
