//! The set of token ids a constrained step may sample (structured outputs, tool calls).
//!
//! The origin of a session runs the grammar; the last stage only applies the set it is sent
//! to the logits before the sampler, so a constraint works through any pipeline and a
//! replay after a failover sends the same set again.

use thiserror::Error;

/// Token ids a step may sample, in whichever of two forms is smaller on the wire.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenMask {
    /// The allowed ids, strictly increasing.
    Allow(Vec<u32>),
    /// A bit per id of the vocabulary: id `i` is allowed when bit `i % 32` of word `i / 32`
    /// is set. Bits past the vocabulary must be clear.
    Bits(Vec<u32>),
}

/// Why a mask does not fit a logits row.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaskError {
    /// The mask allows no id.
    #[error("the token mask allows no token")]
    Empty,
    /// An allowed id is outside the vocabulary, or the ids are not increasing.
    #[error("the token mask's ids are not increasing ids below the vocabulary size {vocab}")]
    BadIds {
        /// The vocabulary size.
        vocab: usize,
    },
    /// A bit mask of the wrong length, or with bits set past the vocabulary.
    #[error("a token bit mask of {words} words does not fit a vocabulary of {vocab} ids")]
    BadBits {
        /// The mask's words.
        words: usize,
        /// The vocabulary size.
        vocab: usize,
    },
}

impl TokenMask {
    /// The smaller form of the ids whose bits are set in `bits` (a bit per id of `vocab`).
    pub fn from_bits(bits: Vec<u32>, vocab: usize) -> Self {
        let count: usize = bits.iter().map(|w| w.count_ones() as usize).sum();
        if count < bits.len() {
            let mut ids = Vec::with_capacity(count);
            for (w, &word) in bits.iter().enumerate() {
                let mut rest = word;
                while rest != 0 {
                    let b = rest.trailing_zeros();
                    let id = w * 32 + b as usize;
                    if id < vocab {
                        ids.push(id as u32);
                    }
                    rest &= rest - 1;
                }
            }
            return Self::Allow(ids);
        }
        let mut bits = bits;
        bits.resize(vocab.div_ceil(32), 0);
        if !vocab.is_multiple_of(32)
            && let Some(last) = bits.last_mut()
        {
            *last &= (1u32 << (vocab % 32)) - 1;
        }
        Self::Bits(bits)
    }

    /// Whether `id` may be sampled.
    pub fn allows(&self, id: u32) -> bool {
        match self {
            Self::Allow(ids) => ids.binary_search(&id).is_ok(),
            Self::Bits(bits) => bits.get(id as usize / 32).is_some_and(|w| w >> (id % 32) & 1 == 1),
        }
    }

    /// Checks that the mask fits a vocabulary of `vocab` ids and allows at least one.
    pub fn validate(&self, vocab: usize) -> Result<(), MaskError> {
        match self {
            Self::Allow(ids) => {
                if ids.is_empty() {
                    return Err(MaskError::Empty);
                }
                let increasing = ids.windows(2).all(|w| w[0] < w[1]);
                if !increasing || ids.last().is_some_and(|&l| l as usize >= vocab) {
                    return Err(MaskError::BadIds { vocab });
                }
            }
            Self::Bits(bits) => {
                let bad = MaskError::BadBits { words: bits.len(), vocab };
                if bits.len() != vocab.div_ceil(32) {
                    return Err(bad);
                }
                if !vocab.is_multiple_of(32) && bits.last().is_some_and(|&w| w >> (vocab % 32) != 0) {
                    return Err(bad);
                }
                if bits.iter().all(|&w| w == 0) {
                    return Err(MaskError::Empty);
                }
            }
        }
        Ok(())
    }

    /// Sets the logits of every id the mask does not allow to `-inf` (masked for the
    /// sampler), after [`TokenMask::validate`] against the row's length.
    pub fn apply(&self, logits: &mut [f32]) -> Result<(), MaskError> {
        self.validate(logits.len())?;
        match self {
            Self::Allow(ids) => {
                let mut next = ids.iter().peekable();
                for (i, l) in logits.iter_mut().enumerate() {
                    if next.peek().is_some_and(|&&id| id as usize == i) {
                        next.next();
                    } else {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            Self::Bits(bits) => {
                for (i, l) in logits.iter_mut().enumerate() {
                    if bits[i / 32] >> (i % 32) & 1 == 0 {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_allow_the_same_ids_and_the_smaller_is_chosen() {
        let vocab = 200;
        let mut bits = vec![0u32; 7];
        for id in [0usize, 31, 32, 199] {
            bits[id / 32] |= 1 << (id % 32);
        }
        let small = TokenMask::from_bits(bits.clone(), vocab);
        assert_eq!(small, TokenMask::Allow(vec![0, 31, 32, 199]));
        let wide = TokenMask::Bits(bits);
        for id in 0..vocab as u32 {
            assert_eq!(small.allows(id), wide.allows(id), "{id}");
        }
        let dense = TokenMask::from_bits(vec![u32::MAX; 7], vocab);
        assert!(matches!(&dense, TokenMask::Bits(b) if b[6] == (1 << 8) - 1));
        dense.validate(vocab).unwrap();
        let mut row = vec![1.0f32; vocab];
        small.apply(&mut row).unwrap();
        let kept: Vec<usize> = (0..vocab).filter(|&i| row[i].is_finite()).collect();
        assert_eq!(kept, [0, 31, 32, 199]);
    }

    #[test]
    fn masks_that_do_not_fit_the_row_are_refused() {
        assert_eq!(TokenMask::Allow(vec![]).validate(10), Err(MaskError::Empty));
        assert_eq!(TokenMask::Allow(vec![3, 3]).validate(10), Err(MaskError::BadIds { vocab: 10 }));
        assert_eq!(TokenMask::Allow(vec![10]).validate(10), Err(MaskError::BadIds { vocab: 10 }));
        assert_eq!(TokenMask::Bits(vec![0]).validate(10), Err(MaskError::Empty));
        assert_eq!(
            TokenMask::Bits(vec![1 << 10]).validate(10),
            Err(MaskError::BadBits { words: 1, vocab: 10 })
        );
        assert_eq!(TokenMask::Bits(vec![1, 0]).validate(10), Err(MaskError::BadBits { words: 2, vocab: 10 }));
    }
}
