//! The row order of the query and key projections, and the one permutation that moves LoRA `B`
//! rows between Hugging Face's order (what PEFT writes) and the engine's.
//!
//! Hugging Face llama checkpoints rotate each head's vector in two halves: dimension `i` pairs
//! with `i + d/2` (`rotate_half`). llama.cpp's converter (`convert_hf_to_gguf.py`,
//! `LlamaModel.permute`) reorders the rows of `q_proj` and `k_proj` so that its rotary embedding
//! can rotate adjacent pairs instead: it reshapes each weight to `[n_head, 2, d/2, in]`, swaps
//! the middle axes and flattens back, so within every head
//!
//! ```text
//! Hugging Face row  h·d + s·d/2 + i   (half s ∈ {0, 1}, i < d/2)
//! GGUF row          h·d + 2·i + s
//! ```
//!
//! (`n_kv_head` heads for `k_proj`). A LoRA delta `ΔW = B·A` adds to those same rows, so an
//! adapter's `B` for q/k must be permuted the same way to act on a GGUF model, and back when it
//! is saved for PEFT. `A` is untouched: the projections' inputs are not reordered. Adapters in
//! memory are always in the engine's order ([`crate::ModelDims::qk_rows`]); only
//! [`crate::peft`] converts, so every folder on disk is in PEFT's order.

use serde::{Deserialize, Serialize};

use crate::{ModelDims, TargetModule};

/// How the output rows of `q_proj` / `k_proj` are ordered in a model's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkRowOrder {
    /// As in the Hugging Face checkpoint (and PEFT's `lora_B`): no permutation.
    #[default]
    HuggingFace,
    /// llama.cpp's GGUF order for interleaved rotary embeddings (see the module docs).
    GgufInterleaved,
}

impl QkRowOrder {
    /// The name recorded in adapter files (`"hugging_face"`, `"gguf_interleaved"`).
    pub fn as_str(self) -> &'static str {
        match self {
            QkRowOrder::HuggingFace => "hugging_face",
            QkRowOrder::GgufInterleaved => "gguf_interleaved",
        }
    }
}

/// The GGUF row that Hugging Face row `hf_row` of a head-major projection becomes.
fn interleaved_row(hf_row: usize, head_dim: usize) -> usize {
    let (head, within) = (hf_row / head_dim, hf_row % head_dim);
    let half = head_dim / 2;
    let (s, i) = (within / half, within % half);
    head * head_dim + 2 * i + s
}

/// Whether `module`'s output rows are reordered by `order`.
fn is_permuted(module: TargetModule, order: QkRowOrder) -> bool {
    order == QkRowOrder::GgufInterleaved && matches!(module, TargetModule::Q | TargetModule::K)
}

/// `b` (`out × cols`, row-major, rows in `from` order) with its rows in `to` order. Only the
/// q/k projections are ever permuted; other modules' matrices come back unchanged.
///
/// # Panics
///
/// If `b` does not hold whole rows of `module`'s output size in a model of `dims`: callers pass
/// matrices they have already checked against `dims`.
pub fn reorder_rows(
    b: &[f32],
    cols: usize,
    module: TargetModule,
    dims: &ModelDims,
    from: QkRowOrder,
    to: QkRowOrder,
) -> Vec<f32> {
    let (_, out_dim) = module.dims(dims);
    assert_eq!(
        b.len(),
        out_dim * cols,
        "{module}'s B must be {out_dim} × {cols}"
    );
    let permuted = (is_permuted(module, from), is_permuted(module, to));
    if permuted.0 == permuted.1 {
        return b.to_vec();
    }
    let mut out = vec![0.0; b.len()];
    for hf_row in 0..out_dim {
        let gguf_row = interleaved_row(hf_row, dims.head_dim);
        let (src, dst) = if permuted.1 {
            (hf_row, gguf_row)
        } else {
            (gguf_row, hf_row)
        };
        out[dst * cols..(dst + 1) * cols].copy_from_slice(&b[src * cols..(src + 1) * cols]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIMS: ModelDims = ModelDims {
        n_layer: 1,
        hidden: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn: 24,
        qk_rows: QkRowOrder::GgufInterleaved,
    };

    #[test]
    fn rows_interleave_the_two_halves_of_each_head() {
        // Head size 4: HF rows (0 1 | 2 3) hold halves s=0 and s=1; GGUF pairs them as 0 2 1 3.
        let order: Vec<usize> = (0..8).map(|r| interleaved_row(r, 4)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
        let order: Vec<usize> = (0..6).map(|r| interleaved_row(r, 6)).collect();
        assert_eq!(order, [0, 2, 4, 1, 3, 5]);
    }

    #[test]
    fn the_round_trip_is_the_identity_and_other_modules_are_untouched() {
        let (hf, gguf) = (QkRowOrder::HuggingFace, QkRowOrder::GgufInterleaved);
        for module in TargetModule::ALL {
            let (_, out_dim) = module.dims(&DIMS);
            let b: Vec<f32> = (0..out_dim * 3).map(|v| v as f32).collect();
            let there = reorder_rows(&b, 3, module, &DIMS, hf, gguf);
            assert_eq!(reorder_rows(&there, 3, module, &DIMS, gguf, hf), b);
            assert_eq!(reorder_rows(&b, 3, module, &DIMS, gguf, gguf), b);
            if matches!(module, TargetModule::Q | TargetModule::K) {
                assert_ne!(there, b, "{module} is permuted");
                // Row 1 of HF (head 0, first half, i = 1) lands on GGUF row 2.
                assert_eq!(there[6..9], b[3..6], "{module}");
            } else {
                assert_eq!(there, b, "{module} keeps its rows");
            }
        }
    }
}
