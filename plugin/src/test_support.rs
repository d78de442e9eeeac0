//! Adapters for the unit tests of this crate.

use adapters::{LoraAdapter, LoraConfig, ModelDims, QkRowOrder};

/// A two-layer rank-2 adapter on a toy model, with B set to small values of both signs (a fresh
/// adapter's B is 0), so that every tensor moves under an update and weight decay shows.
pub(crate) fn adapter_with_nonzero_b(seed: u64) -> LoraAdapter {
    let dims = ModelDims {
        n_layer: 2,
        hidden: 8,
        n_head: 2,
        n_kv_head: 1,
        head_dim: 4,
        ffn: 16,
        qk_rows: QkRowOrder::HuggingFace,
    };
    let config = LoraConfig {
        rank: 2,
        alpha: 4.0,
        ..LoraConfig::default()
    };
    let mut adapter =
        LoraAdapter::new_initialized(config, dims, seed).expect("a valid toy adapter");
    for (i, b) in adapter
        .layers
        .values_mut()
        .flat_map(|l| l.b.iter_mut())
        .enumerate()
    {
        *b = (i as f32 * 0.37).sin() * 0.1;
    }
    adapter
}
