//! What sealing the sampler's inputs costs (`protocol::seal`): the key agreement once per
//! session on each side, and sealing plus opening one step's box, for a decode step (one
//! history id), a speculative step (one id and 8 draft ids), a 256-token prefill chunk and a
//! constrained step with SmolLM2's full bitmask (1,536 words).
//!
//! `cargo bench --profile dev -p shoal-worker --bench seal`

use criterion::{Criterion, criterion_main};
use shoal_worker::protocol::TokenMask;
use shoal_worker::protocol::seal::{SamplerInputs, SealKey, x25519_secret};

fn bench(c: &mut Criterion) {
    let node = iroh::SecretKey::generate();
    let id = *node.public().as_bytes();
    let secret = x25519_secret(&node);
    let (public, origin) = SealKey::send_to(&id).expect("a valid node id");
    let stage = SealKey::receive(&public, &secret, &id).expect("not a weak key");
    c.bench_function("seal/session key, origin side", |b| b.iter(|| SealKey::send_to(&id)));
    c.bench_function("seal/session key, last stage side", |b| {
        b.iter(|| SealKey::receive(&public, &secret, &id))
    });
    let cases = [
        ("decode step", SamplerInputs { history_tail: vec![42], draft: vec![], mask: None }),
        (
            "speculative step, 8 drafted",
            SamplerInputs { history_tail: vec![42], draft: (0..8).collect(), mask: None },
        ),
        (
            "prefill chunk, 256 ids",
            SamplerInputs { history_tail: (0..256).collect(), draft: vec![], mask: None },
        ),
        (
            "constrained step, 49,152-id bitmask",
            SamplerInputs {
                history_tail: vec![42],
                draft: vec![],
                mask: Some(TokenMask::Bits(vec![u32::MAX; 1536])),
            },
        ),
    ];
    for (name, inputs) in cases {
        c.bench_function(&format!("seal/seal and open: {name}"), |b| {
            b.iter(|| {
                let sealed = origin.seal(7, 11, &inputs);
                stage.open(7, 11, &sealed).expect("opens")
            })
        });
    }
}

#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::bench);
}
criterion_main!(group::benches);
