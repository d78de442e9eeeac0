//! Models in the formats people download (what llama.cpp's Q4_K_M, Q5_K_M and Q6_K files hold):
//! the default model requantized with candle's quantizer, written as a GGUF, served and scored
//! with the weights kept in their formats and held to the same file dequantized at load.

mod common;

use std::path::Path;

use adapters::{LoraAdapter, LoraConfig};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;
use plugin::ZoEngine;

/// The type a tensor is requantized to: the K-quants where the columns are whole super-blocks
/// of 256 (SmolLM2's `ffn_down`, 1536 columns), the 5-bit formats elsewhere (576 columns), as
/// llama.cpp's quantizer falls back for such tensors; norms and embeddings stay as they are.
fn requantized_type(name: &str, layer: usize) -> Option<GgmlDType> {
    if name.ends_with("ffn_down.weight") {
        return Some([GgmlDType::Q4K, GgmlDType::Q5K, GgmlDType::Q6K][layer % 3]);
    }
    let projections = [
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
    ];
    projections
        .iter()
        .any(|p| name.ends_with(&format!("{p}.weight")))
        .then(|| [GgmlDType::Q5_0, GgmlDType::Q5_1][layer % 2])
}

/// Writes the default model with its projections requantized to `path`.
fn write_requantized(path: &Path) {
    common::write_model_variant(
        path,
        |_| {},
        |name, tensor| {
            let layer = name
                .split('.')
                .nth(1)
                .and_then(|i| i.parse::<usize>().ok())
                .unwrap_or(0);
            Some(match requantized_type(name, layer) {
                Some(dtype) => {
                    let dense = tensor.dequantize(&Device::Cpu).expect("dequantize");
                    QTensor::quantize(&dense, dtype).expect("requantize")
                }
                None => tensor,
            })
        },
        Vec::new(),
    );
}

#[test]
fn a_k_quant_model_serves_and_scores_as_its_dequantized_weights() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("smollm2-k-quants.gguf");
    write_requantized(&path);
    let kept = LoadedModel::load(&path, WeightMode::Quantized).expect("load, formats kept");
    let dense = LoadedModel::load(&path, WeightMode::F32).expect("load, dequantized");

    // Every projection is kept in its own format: no 8-bit activations, no silent f32 copy.
    // Q5_0 is kept as the Q8_0 blocks of the same values, which the fast Q8_0 kernels read.
    let types = kept.transformer.matrix_types();
    let n_layer = kept.transformer.config.n_layer;
    for (dtype, expected) in [
        ("Q4K", n_layer.div_ceil(3)),
        ("Q5K", (n_layer + 1) / 3),
        ("Q6K", n_layer / 3),
        ("Q5_1", 6 * (n_layer / 2)),
    ] {
        assert_eq!(types.get(dtype), Some(&expected), "{types:?}");
    }
    assert!(
        !types.contains_key("Q5_0") && !types.contains_key("F32"),
        "{types:?}"
    );
    let q8 = types.get("Q8_0").copied().unwrap_or(0);
    assert!(q8 >= 6 * n_layer.div_ceil(2), "{types:?}");
    assert!(
        kept.transformer.weights_size_bytes() * 3 < dense.transformer.weights_size_bytes(),
        "the kept formats take {} bytes, the f32 weights {}",
        kept.transformer.weights_size_bytes(),
        dense.transformer.weights_size_bytes()
    );

    // A fresh adapter (B = 0) adds exactly nothing: the base model's outputs.
    let fresh =
        LoraAdapter::new_initialized(LoraConfig::default(), kept.transformer.config.dims(), 0)
            .expect("a fresh adapter");

    // Scoring: the same bits as the dequantized weights.
    let items = common::sentiment_items(
        &kept,
        &[
            "Review: a tender, funny and beautifully acted film.\nSentiment:",
            "Review: two hours I will never get back.\nSentiment:",
        ],
    );
    let scored = kept.score(&[&fresh], &items).expect("score, formats kept");
    let reference = dense.score(&[&fresh], &items).expect("score, dequantized");
    assert_eq!(scored, reference);
    let all_finite = scored
        .iter()
        .flatten()
        .flatten()
        .flatten()
        .all(|lp| lp.is_finite());
    assert!(all_finite && !scored.is_empty());

    // Serving: the same greedy answer.
    let prompt = kept.tokenize("The capital of France is", false);
    let answer = kept
        .generate_greedy(&[&fresh], std::slice::from_ref(&prompt), 12)
        .expect("generate, formats kept");
    let reference = dense
        .generate_greedy(&[&fresh], &[prompt], 12)
        .expect("generate, dequantized");
    assert_eq!(answer, reference);
    assert!(!answer[0][0].trim().is_empty(), "{answer:?}");
}
