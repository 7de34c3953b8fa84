//! Sampling defaults: what a request gets for a sampling field it leaves out.
//!
//! Each field is decided on its own, first source that has it wins:
//! 1. the request's own field;
//! 2. the operator's server-side default (`--default-temperature`, ... on the command line);
//! 3. the model's recommendation, when it carries one (a Hugging Face directory's
//!    `generation_config.json`: `temperature`, `top_p`, `top_k`, `min_p`,
//!    `repetition_penalty`, as vLLM reads them with `--generation-config auto`; a GGUF's
//!    `general.sampling.temp`, `.top_p`, `.top_k`, `.min_p`, `.penalty_repeat`, as llama.cpp
//!    reads them);
//! 4. shoal's own defaults, [`SamplingDefaults::SHOAL`]: temperature 0.2 and top-p 0.9, what
//!    the authors of SmolLM2 (the model `deploy/fetch-model.sh` fetches, whose GGUF carries
//!    no recommendation) recommend; top-k, min-p and the repetition penalty stay off. OpenAI's
//!    own defaults (temperature 1, no truncation) suit OpenAI's large models; a small model
//!    at temperature 1 over its whole vocabulary drifts off topic (SmolLM2-135M answered
//!    "Name three fruits." with text about programming, or about Troy), while at 0.2 it
//!    lists three fruits. Models that carry their own recommendation get it instead.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use serde::Deserialize;
use shoal_model_shards::Model;
use shoal_model_shards::sampler::{SamplerError, SamplingParams};

/// A default for each sampling field that has one; `None` leaves the field to the next
/// source.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    /// Temperature (0 is greedy).
    pub temperature: Option<f32>,
    /// Nucleus mass, in (0, 1].
    pub top_p: Option<f32>,
    /// Top-k; 0 disables it.
    pub top_k: Option<u32>,
    /// Min-p, in [0, 1].
    pub min_p: Option<f32>,
    /// Repetition penalty (1 is neutral).
    pub repetition_penalty: Option<f32>,
}

/// Why a model's recommended defaults could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DefaultsError {
    /// `generation_config.json` could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `generation_config.json` is not the JSON it should be.
    #[error("{path} is not a valid generation config: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: serde_json::Error,
    },
    /// A GGUF sampling key holds something other than a number.
    #[error("the GGUF key {key} is not a number")]
    NotANumber {
        /// The key.
        key: &'static str,
    },
    /// A value is outside the range the sampler accepts.
    #[error("{source} ({origin})")]
    OutOfRange {
        /// Where the value came from.
        origin: String,
        /// The sampler's complaint.
        source: SamplerError,
    },
}

/// The fields of `generation_config.json` that vLLM's `--generation-config auto` takes.
#[derive(Debug, Default, Deserialize)]
struct GenerationConfig {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
}

fn number(v: &gguf_file::Value) -> Option<f64> {
    use gguf_file::Value as V;
    Some(match v {
        V::U8(x) => f64::from(*x),
        V::I8(x) => f64::from(*x),
        V::U16(x) => f64::from(*x),
        V::I16(x) => f64::from(*x),
        V::U32(x) => f64::from(*x),
        V::I32(x) => f64::from(*x),
        V::U64(x) => *x as f64,
        V::I64(x) => *x as f64,
        V::F32(x) => f64::from(*x),
        V::F64(x) => *x,
        _ => return None,
    })
}

/// A top-k as the sampler takes it: a negative or zero value disables it.
fn top_k_of(k: f64) -> u32 {
    if k.is_finite() && k >= 1.0 { k.min(f64::from(u32::MAX)) as u32 } else { 0 }
}

impl SamplingDefaults {
    /// shoal's own defaults, used for every field that neither the request, the operator nor
    /// the model sets (see the module documentation for why).
    pub const SHOAL: Self = Self {
        temperature: Some(0.2),
        top_p: Some(0.9),
        top_k: Some(0),
        min_p: Some(0.0),
        repetition_penalty: Some(1.0),
    };

    /// Field by field, `self`'s value, or `fallback`'s where `self` has none.
    pub fn or(self, fallback: Self) -> Self {
        Self {
            temperature: self.temperature.or(fallback.temperature),
            top_p: self.top_p.or(fallback.top_p),
            top_k: self.top_k.or(fallback.top_k),
            min_p: self.min_p.or(fallback.min_p),
            repetition_penalty: self.repetition_penalty.or(fallback.repetition_penalty),
        }
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The model's recommended defaults: from `generation_config.json` in a Hugging Face
    /// directory, or the `general.sampling.*` keys of a GGUF file. A model that carries none
    /// gives an empty set.
    pub fn of_model(model: &Model) -> Result<Self, DefaultsError> {
        let d = match model.gguf_content() {
            Some(content) => Self::of_gguf(content)?,
            None => Self::of_hf_dir(model.path())?,
        };
        d.check(if model.gguf_content().is_some() {
            "the GGUF's general.sampling keys".to_owned()
        } else {
            model.path().join("generation_config.json").display().to_string()
        })?;
        Ok(d)
    }

    /// The `generation_config.json` of `dir`, if there is one.
    pub fn of_hf_dir(dir: &Path) -> Result<Self, DefaultsError> {
        let path = dir.join("generation_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let bytes =
            std::fs::read(&path).map_err(|source| DefaultsError::Io { path: path.clone(), source })?;
        let c: GenerationConfig =
            serde_json::from_slice(&bytes).map_err(|source| DefaultsError::Json { path, source })?;
        Ok(Self {
            temperature: c.temperature.map(|x| x as f32),
            top_p: c.top_p.map(|x| x as f32),
            top_k: c.top_k.map(|k| top_k_of(k as f64)),
            min_p: c.min_p.map(|x| x as f32),
            repetition_penalty: c.repetition_penalty.map(|x| x as f32),
        })
    }

    /// The `general.sampling.*` keys of a GGUF file.
    pub fn of_gguf(content: &gguf_file::Content) -> Result<Self, DefaultsError> {
        let get = |key: &'static str| -> Result<Option<f64>, DefaultsError> {
            content.metadata.get(key).map(|v| number(v).ok_or(DefaultsError::NotANumber { key })).transpose()
        };
        Ok(Self {
            temperature: get("general.sampling.temp")?.map(|x| x as f32),
            top_p: get("general.sampling.top_p")?.map(|x| x as f32),
            top_k: get("general.sampling.top_k")?.map(top_k_of),
            min_p: get("general.sampling.min_p")?.map(|x| x as f32),
            repetition_penalty: get("general.sampling.penalty_repeat")?.map(|x| x as f32),
        })
    }

    /// Checks the fields that are set against the sampler's ranges; `origin` names where
    /// they came from in the error.
    pub fn check(&self, origin: impl Into<String>) -> Result<(), DefaultsError> {
        self.apply(SamplingParams { temperature: 1.0, ..SamplingParams::default() })
            .validate()
            .map_err(|source| DefaultsError::OutOfRange { origin: origin.into(), source })
    }

    /// `params` with every field that is set here replaced.
    pub fn apply(&self, mut params: SamplingParams) -> SamplingParams {
        if let Some(t) = self.temperature {
            params.temperature = t;
        }
        if let Some(p) = self.top_p {
            params.top_p = p;
        }
        if let Some(k) = self.top_k {
            params.top_k = (k > 0).then_some(k);
        }
        if let Some(m) = self.min_p {
            params.min_p = m;
        }
        if let Some(r) = self.repetition_penalty {
            params.repetition_penalty = r;
        }
        params
    }

    /// `temperature 0.8, top_p 0.95, ...`: the fields that are set, for logs and banners.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(t) = self.temperature {
            parts.push(format!("temperature {t}"));
        }
        if let Some(p) = self.top_p {
            parts.push(format!("top_p {p}"));
        }
        if let Some(k) = self.top_k {
            parts.push(if k == 0 { "top_k off".to_owned() } else { format!("top_k {k}") });
        }
        if let Some(m) = self.min_p {
            parts.push(format!("min_p {m}"));
        }
        if let Some(r) = self.repetition_penalty {
            parts.push(format!("repetition_penalty {r}"));
        }
        if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_config_fields_are_read_and_others_ignored() {
        let dir = std::env::temp_dir().join(format!("shoal-genconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(SamplingDefaults::of_hf_dir(&dir).unwrap(), SamplingDefaults::default());
        std::fs::write(
            dir.join("generation_config.json"),
            r#"{"bos_token_id": 1, "do_sample": true, "temperature": 0.6, "top_p": 0.95, "top_k": 20,
                "eos_token_id": [2, 3], "transformers_version": "4.51.0"}"#,
        )
        .unwrap();
        let d = SamplingDefaults::of_hf_dir(&dir).unwrap();
        assert_eq!(
            d,
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.95),
                top_k: Some(20),
                min_p: None,
                repetition_penalty: None
            }
        );
        std::fs::write(dir.join("generation_config.json"), "{\"temperature\": \"hot\"}").unwrap();
        let e = SamplingDefaults::of_hf_dir(&dir).unwrap_err();
        assert!(matches!(e, DefaultsError::Json { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn gguf_sampling_keys_are_read() {
        use gguf_file::Value as V;
        let content = |pairs: Vec<(&str, V)>| gguf_file::Content {
            magic: gguf_file::VersionedMagic::GgufV3,
            metadata: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            tensor_infos: Default::default(),
            tensor_data_offset: 0,
        };
        assert_eq!(SamplingDefaults::of_gguf(&content(vec![])).unwrap(), SamplingDefaults::default());
        let c = content(vec![
            ("general.sampling.temp", V::F32(0.6)),
            ("general.sampling.top_p", V::F32(0.95)),
            ("general.sampling.top_k", V::I32(20)),
            ("general.sampling.min_p", V::F64(0.0)),
            ("general.sampling.penalty_repeat", V::F32(1.1)),
            ("general.sampling.sequence", V::String("edkypmxt".into())),
        ]);
        let d = SamplingDefaults::of_gguf(&c).unwrap();
        assert_eq!(
            d,
            SamplingDefaults {
                temperature: Some(0.6),
                top_p: Some(0.95),
                top_k: Some(20),
                min_p: Some(0.0),
                repetition_penalty: Some(1.1)
            }
        );
        // llama.cpp's top_k 0 (off) stays off.
        let off = SamplingDefaults::of_gguf(&content(vec![("general.sampling.top_k", V::I32(0))])).unwrap();
        assert_eq!(off.top_k, Some(0));
        let bad = content(vec![("general.sampling.temp", V::String("hot".into()))]);
        assert!(matches!(SamplingDefaults::of_gguf(&bad), Err(DefaultsError::NotANumber { .. })));
    }

    #[test]
    fn sources_combine_field_by_field() {
        let operator = SamplingDefaults { temperature: Some(0.2), ..SamplingDefaults::default() };
        let model =
            SamplingDefaults { temperature: Some(0.7), top_p: Some(0.8), ..SamplingDefaults::default() };
        let d = operator.or(model).or(SamplingDefaults::SHOAL);
        assert_eq!(d.temperature, Some(0.2));
        assert_eq!(d.top_p, Some(0.8));
        assert_eq!(d.top_k, Some(0));
        let p = d.apply(SamplingParams { top_k: Some(3), ..SamplingParams::default() });
        assert_eq!((p.temperature, p.top_p, p.top_k, p.min_p), (0.2, 0.8, None, 0.0));
        let k = SamplingDefaults { top_k: Some(7), ..SamplingDefaults::default() };
        assert_eq!(k.apply(p).top_k, Some(7));
    }

    #[test]
    fn out_of_range_values_are_named() {
        let bad = SamplingDefaults { top_p: Some(0.0), ..SamplingDefaults::default() };
        let e = bad.check("--default-top-p").unwrap_err().to_string();
        assert!(e.contains("top_p") && e.contains("--default-top-p"), "{e}");
        SamplingDefaults::SHOAL.check("shoal").unwrap();
    }
}
