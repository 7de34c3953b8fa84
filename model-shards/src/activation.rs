//! Hidden states as bytes: the payload that crosses the wire between spans.
//!
//! Layout: `t × hidden` values, row-major, little-endian, in the wire dtype (f16 by default,
//! bf16 or f32 on request). f16 costs `2 × hidden` bytes per token (1,152 bytes for SmolLM2's
//! 576-wide residual stream). Decoding checks the byte count against the shape before
//! allocating and rejects non-finite values, since the bytes come from another peer.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{Error, Result};

/// Element type of hidden states on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireDType {
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// Single precision (no loss; twice the bytes).
    F32,
}

impl WireDType {
    /// Bytes per value.
    pub fn size(self) -> usize {
        match self {
            Self::F16 | Self::Bf16 => 2,
            Self::F32 => 4,
        }
    }

    /// The wire code used by the stage protocol.
    pub fn code(self) -> u8 {
        match self {
            Self::F16 => 1,
            Self::Bf16 => 2,
            Self::F32 => 3,
        }
    }

    /// Parses a wire code.
    pub fn from_code(code: u8) -> Result<Self> {
        match code {
            1 => Ok(Self::F16),
            2 => Ok(Self::Bf16),
            3 => Ok(Self::F32),
            other => Err(Error::InvalidInput(format!("unknown activation dtype code {other}"))),
        }
    }
}

/// Encodes hidden states `(t, hidden)` into wire bytes.
pub fn encode(hidden: &Tensor, dtype: WireDType) -> Result<Vec<u8>> {
    let values = hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        WireDType::F16 => values.iter().for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        WireDType::Bf16 => {
            values.iter().for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes()))
        }
        WireDType::F32 => values.iter().for_each(|&v| out.extend_from_slice(&v.to_le_bytes())),
    }
    Ok(out)
}

/// Decodes wire bytes into hidden states `(t, hidden)` as f32 on `device`, after checking the
/// size and that every value is finite.
pub fn decode(bytes: &[u8], dtype: WireDType, t: usize, hidden: usize, device: &Device) -> Result<Tensor> {
    let expected = t.checked_mul(hidden).and_then(|n| n.checked_mul(dtype.size()));
    if expected != Some(bytes.len()) {
        return Err(Error::InvalidInput(format!(
            "activation payload of {} bytes does not hold {t} × {hidden} {dtype:?} values",
            bytes.len()
        )));
    }
    let values: Vec<f32> = match dtype {
        WireDType::F16 => bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        WireDType::Bf16 => {
            bytes.chunks_exact(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        WireDType::F32 => {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::InvalidInput(format!("activation value {i} is not finite")));
    }
    Ok(Tensor::from_vec(values, (t, hidden), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_checks() -> Result<()> {
        let d = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, -2.5, 3.25], [0.5, 100.0, -0.125]], &d)?;
        for dt in [WireDType::F16, WireDType::Bf16, WireDType::F32] {
            let b = encode(&x, dt)?;
            assert_eq!(b.len(), 6 * dt.size());
            let y = decode(&b, dt, 2, 3, &d)?;
            assert_eq!(y.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
            assert!(decode(&b, dt, 3, 3, &d).is_err());
            assert_eq!(WireDType::from_code(dt.code())?, dt);
        }
        let nan = Tensor::new(&[[f32::NAN, 1.0]], &d)?;
        let b = encode(&nan, WireDType::F16)?;
        assert!(matches!(decode(&b, WireDType::F16, 1, 2, &d), Err(Error::InvalidInput(_))));
        assert!(WireDType::from_code(9).is_err());
        Ok(())
    }
}
