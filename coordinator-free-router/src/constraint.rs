//! Constrained decoding seen from the driver: a grammar the generated tokens must follow,
//! run at the origin. Before each sampled step the driver asks it for the ids the next token
//! may take and sends them with the step ([`TokenMask`]); the last stage applies them before
//! its sampler. A replay after a failover sends the same masks, so its tokens are the same.

use std::fmt;
use std::sync::{Arc, Mutex};

use shoal_model_shards::token_mask::TokenMask;

/// A grammar's state over the generated tokens.
pub trait TokenConstraint: Send {
    /// The ids the next token may take, or `None` when the grammar is complete and allows
    /// no further token (the generation then ends with `stop`). Asking twice without
    /// [`TokenConstraint::advance`] gives the same answer.
    fn next_mask(&mut self) -> Result<Option<TokenMask>, String>;

    /// Moves past `token`, which the last [`TokenConstraint::next_mask`] allowed.
    fn advance(&mut self, token: u32) -> Result<(), String>;
}

/// A [`TokenConstraint`] shared by a request and its driver.
#[derive(Clone)]
pub struct Constraint(Arc<Mutex<Box<dyn TokenConstraint>>>);

impl Constraint {
    /// Wraps `c`.
    pub fn new(c: impl TokenConstraint + 'static) -> Self {
        Self(Arc::new(Mutex::new(Box::new(c))))
    }

    /// [`TokenConstraint::next_mask`].
    pub fn next_mask(&self) -> Result<Option<TokenMask>, String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).next_mask()
    }

    /// [`TokenConstraint::advance`].
    pub fn advance(&self, token: u32) -> Result<(), String> {
        self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).advance(token)
    }
}

impl fmt::Debug for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Constraint")
    }
}
