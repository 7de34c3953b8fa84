//! Sealed sampler inputs: the token history, draft ids and token mask of a step, readable by
//! the route's last stage alone.
//!
//! Every stage relays a step to the next one, but only the last stage samples, so only it
//! needs the ids. The origin seals them for that stage's node id; the stages in between
//! forward an opaque box.
//!
//! # The key
//! The origin picks an ephemeral X25519 secret `e` per session and puts `E = e·G` in the
//! session's [`OpenSession::seal`](super::OpenSession::seal). The last stage's X25519 key is
//! its node id (an Ed25519 public key) in Montgomery form, as libsodium's
//! `crypto_sign_ed25519_pk_to_curve25519` and age's `ssh-ed25519` recipients convert it; its
//! secret is the hashed Ed25519 seed. Both sides compute the Diffie-Hellman point `S` and
//! derive `key = BLAKE3-derive_key(CONTEXT, S ‖ E ‖ node_id)`. A hop in between knows `E`
//! and the node id, not `S`.
//!
//! # The box
//! `nonce (12 bytes) ‖ AES-256-GCM(key, nonce, inputs, aad = session_id ‖ step_id)`, the
//! nonce random. The associated data binds a box to its step: moved to another step or
//! session, or changed by one bit, it fails to open. The plaintext is the history tail, the
//! draft ids and the mask, encoded as in a plain step.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use curve25519_dalek::montgomery::MontgomeryPoint;

use super::{
    MAX_DRAFT, MAX_HISTORY_TAIL, MAX_MASK_WORDS, ProtocolError, Reader, Step, TAG_MASK_ALLOW, TAG_MASK_BITS,
    TAG_NO_MASK, TokenMask, put_u32s,
};

/// BLAKE3 key-derivation context of the sampler seal.
const CONTEXT: &str = "shoal 2026-12 stage protocol 5 sampler seal key";

/// Bytes a box adds to its plaintext: the nonce and the GCM tag.
pub const SEAL_OVERHEAD: usize = 12 + 16;

/// Largest box a step may carry: the largest history tail, draft and mask, sealed.
pub const MAX_SEALED: usize =
    4 + 4 * MAX_HISTORY_TAIL + 4 + 4 * MAX_DRAFT + 1 + 4 + 4 * MAX_MASK_WORDS + SEAL_OVERHEAD;

/// Why a seal could not be made or opened.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SealError {
    /// The recipient's node id is not an Ed25519 public key.
    #[error("the last hop's node id is not a valid public key")]
    BadRecipient,
    /// The ephemeral key gives the all-zero shared point (a small-order point).
    #[error("the session's seal key is a small-order point")]
    WeakKey,
    /// The box did not authenticate: wrong key, wrong step, or changed on the way.
    #[error("the sealed sampler inputs do not open: changed on the way, or sealed for another stage or step")]
    Forged,
    /// The box opened but its contents are malformed.
    #[error("the sealed sampler inputs are malformed: {0}")]
    Malformed(ProtocolError),
}

/// The sampler's inputs of one step, as the last stage needs them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SamplerInputs {
    /// Ids appended to the history since the previous step.
    pub history_tail: Vec<u32>,
    /// The draft ids of a speculative step.
    pub draft: Vec<u32>,
    /// The ids the sampled token may take.
    pub mask: Option<TokenMask>,
}

/// The symmetric key of one session's sampler seal.
#[derive(Clone)]
pub struct SealKey(Aes256Gcm);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(..)")
    }
}

/// The X25519 secret of a node's Ed25519 identity, as [`SealKey::receive`] takes it.
pub fn x25519_secret(node_key: &iroh::SecretKey) -> [u8; 32] {
    node_key.as_signing_key().to_scalar_bytes()
}

impl SealKey {
    /// The origin's side: a fresh ephemeral key for a session whose last hop is `recipient`.
    /// Returns the ephemeral public key (for [`OpenSession::seal`](super::OpenSession::seal))
    /// and the session's key.
    pub fn send_to(recipient: &[u8; 32]) -> Result<([u8; 32], SealKey), SealError> {
        let point = ed25519_dalek::VerifyingKey::from_bytes(recipient)
            .map_err(|_| SealError::BadRecipient)?
            .to_montgomery();
        let ephemeral: [u8; 32] = rand::random();
        let public = MontgomeryPoint::mul_base_clamped(ephemeral).to_bytes();
        let shared = point.mul_clamped(ephemeral);
        Ok((public, Self::derive(&shared, &public, recipient)?))
    }

    /// The last stage's side: the session's key from the ephemeral public key in its
    /// `OpenSession`, the stage's [`x25519_secret`] and its node id.
    pub fn receive(
        ephemeral: &[u8; 32],
        secret: &[u8; 32],
        node_id: &[u8; 32],
    ) -> Result<SealKey, SealError> {
        let shared = MontgomeryPoint(*ephemeral).mul_clamped(*secret);
        Self::derive(&shared, ephemeral, node_id)
    }

    fn derive(
        shared: &MontgomeryPoint,
        ephemeral: &[u8; 32],
        node_id: &[u8; 32],
    ) -> Result<SealKey, SealError> {
        if shared.to_bytes() == [0; 32] {
            return Err(SealError::WeakKey);
        }
        let mut material = [0u8; 96];
        material[..32].copy_from_slice(shared.as_bytes());
        material[32..64].copy_from_slice(ephemeral);
        material[64..].copy_from_slice(node_id);
        let key = blake3::derive_key(CONTEXT, &material);
        Aes256Gcm::new_from_slice(&key).map(SealKey).map_err(|_| SealError::BadRecipient)
    }

    /// Seals `inputs` for step `step_id` of session `session_id`.
    pub fn seal(&self, session_id: u64, step_id: u64, inputs: &SamplerInputs) -> Vec<u8> {
        let mut plain = Vec::with_capacity(
            13 + 4 * (inputs.history_tail.len() + inputs.draft.len())
                + inputs.mask.as_ref().map_or(0, mask_len),
        );
        put_u32s(&mut plain, &inputs.history_tail);
        put_u32s(&mut plain, &inputs.draft);
        match &inputs.mask {
            None => plain.push(TAG_NO_MASK),
            Some(TokenMask::Allow(ids)) => {
                plain.push(TAG_MASK_ALLOW);
                put_u32s(&mut plain, ids);
            }
            Some(TokenMask::Bits(bits)) => {
                plain.push(TAG_MASK_BITS);
                put_u32s(&mut plain, bits);
            }
        }
        let nonce: [u8; 12] = rand::random();
        let aad = aad(session_id, step_id);
        let mut out = Vec::with_capacity(plain.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        // Encryption with a valid key fails only for plaintexts near 64 GiB, which a step's
        // limits rule out; an empty box then fails to open at the last stage.
        if let Ok(ct) = self.0.encrypt(Nonce::from_slice(&nonce), Payload { msg: &plain, aad: &aad }) {
            out.extend_from_slice(&ct);
        }
        out
    }

    /// `step` as a sealed session sends it: its history tail, draft ids and mask move into a
    /// box and the draft keeps only its length (zeros).
    pub fn seal_step(&self, mut step: Step) -> Step {
        let inputs = SamplerInputs {
            history_tail: std::mem::take(&mut step.history_tail),
            draft: step.draft.clone(),
            mask: step.mask.take(),
        };
        step.draft.iter_mut().for_each(|id| *id = 0);
        step.sealed = Some(self.seal(step.session_id, step.step_id, &inputs));
        step
    }

    /// Opens the box of step `step_id` of session `session_id`.
    pub fn open(&self, session_id: u64, step_id: u64, sealed: &[u8]) -> Result<SamplerInputs, SealError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(SealError::Forged);
        }
        let (nonce, ct) = sealed.split_at(12);
        let aad = aad(session_id, step_id);
        let plain = self
            .0
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: &aad })
            .map_err(|_| SealError::Forged)?;
        let mut r = Reader { buf: &plain };
        let history_tail = r.u32s("sealed.history_tail", MAX_HISTORY_TAIL).map_err(SealError::Malformed)?;
        let draft = r.u32s("sealed.draft", MAX_DRAFT).map_err(SealError::Malformed)?;
        let mask = match r.u8("sealed.mask tag").map_err(SealError::Malformed)? {
            TAG_NO_MASK => None,
            TAG_MASK_ALLOW => {
                Some(TokenMask::Allow(r.u32s("sealed.mask", MAX_MASK_WORDS).map_err(SealError::Malformed)?))
            }
            TAG_MASK_BITS => {
                Some(TokenMask::Bits(r.u32s("sealed.mask", MAX_MASK_WORDS).map_err(SealError::Malformed)?))
            }
            tag => return Err(SealError::Malformed(ProtocolError::UnknownMask(tag))),
        };
        if !r.buf.is_empty() {
            return Err(SealError::Malformed(ProtocolError::TrailingBytes {
                kind: "sealed sampler inputs",
                count: r.buf.len(),
            }));
        }
        Ok(SamplerInputs { history_tail, draft, mask })
    }
}

fn mask_len(mask: &TokenMask) -> usize {
    let (TokenMask::Allow(w) | TokenMask::Bits(w)) = mask;
    4 + 4 * w.len()
}

fn aad(session_id: u64, step_id: u64) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&session_id.to_le_bytes());
    a[8..].copy_from_slice(&step_id.to_le_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> (iroh::SecretKey, [u8; 32]) {
        let key = iroh::SecretKey::generate();
        let id = *key.public().as_bytes();
        (key, id)
    }

    fn inputs() -> SamplerInputs {
        SamplerInputs { history_tail: vec![1, 2, 3, 70_000], draft: vec![9, 8], mask: None }
    }

    #[test]
    fn the_recipient_opens_what_the_origin_sealed() {
        let (key, id) = node();
        let (public, origin) = SealKey::send_to(&id).expect("valid recipient");
        let stage = SealKey::receive(&public, &x25519_secret(&key), &id).expect("not weak");
        for want in [
            inputs(),
            SamplerInputs::default(),
            SamplerInputs { history_tail: vec![5], draft: vec![], mask: Some(TokenMask::Allow(vec![3, 4])) },
            SamplerInputs {
                history_tail: vec![],
                draft: vec![],
                mask: Some(TokenMask::Bits(vec![u32::MAX; 3])),
            },
        ] {
            let sealed = origin.seal(7, 11, &want);
            assert_eq!(stage.open(7, 11, &sealed), Ok(want));
        }
    }

    #[test]
    fn another_node_or_another_step_cannot_open_a_box() {
        let (_, id) = node();
        let (other, other_id) = node();
        let (public, origin) = SealKey::send_to(&id).expect("valid recipient");
        let sealed = origin.seal(7, 11, &inputs());
        // A hop in between knows the ephemeral key and the recipient's id, not its secret.
        let wrong = SealKey::receive(&public, &x25519_secret(&other), &id).expect("not weak");
        assert_eq!(wrong.open(7, 11, &sealed), Err(SealError::Forged));
        let wrong = SealKey::receive(&public, &x25519_secret(&other), &other_id).expect("not weak");
        assert_eq!(wrong.open(7, 11, &sealed), Err(SealError::Forged));
        let (_, again) = SealKey::send_to(&id).expect("valid recipient");
        assert_eq!(
            again.open(7, 11, &sealed),
            Err(SealError::Forged),
            "a fresh ephemeral key is another key"
        );
    }

    #[test]
    fn a_moved_or_changed_box_does_not_open() {
        let (key, id) = node();
        let (public, origin) = SealKey::send_to(&id).expect("valid recipient");
        let stage = SealKey::receive(&public, &x25519_secret(&key), &id).expect("not weak");
        let sealed = origin.seal(7, 11, &inputs());
        assert_eq!(stage.open(7, 12, &sealed), Err(SealError::Forged), "another step");
        assert_eq!(stage.open(8, 11, &sealed), Err(SealError::Forged), "another session");
        for i in 0..sealed.len() {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            assert_eq!(stage.open(7, 11, &bad), Err(SealError::Forged), "bit flipped at {i}");
        }
        assert_eq!(stage.open(7, 11, &sealed[..SEAL_OVERHEAD - 1]), Err(SealError::Forged));
    }

    #[test]
    fn the_box_hides_the_ids() {
        let (_, id) = node();
        let (_, origin) = SealKey::send_to(&id).expect("valid recipient");
        let a = origin.seal(7, 11, &inputs());
        let b = origin.seal(7, 11, &inputs());
        assert_ne!(a, b, "a random nonce per box: equal inputs do not give equal boxes");
        assert_eq!(a.len(), 4 + 16 + 4 + 8 + 1 + SEAL_OVERHEAD);
    }

    #[test]
    fn small_order_keys_and_bad_recipients_are_refused() {
        let (key, id) = node();
        assert_eq!(
            SealKey::receive(&[0; 32], &x25519_secret(&key), &id).map(|_| ()),
            Err(SealError::WeakKey)
        );
        // Not a point on the curve: y = 2 has no x.
        let mut bad = [0u8; 32];
        bad[0] = 2;
        assert_eq!(SealKey::send_to(&bad).map(|_| ()), Err(SealError::BadRecipient));
    }
}
