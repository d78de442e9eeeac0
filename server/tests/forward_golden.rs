//! The forward pass against the independent reference (HF transformers on the dequantized GGUF):
//! next-token log-probs within 2e-3, the same top-1 token at every position, in both weight modes
//! where the numerics allow it.

mod common;

use candle_core::{IndexOp, Tensor};
use mezo_server::engine::batch::{BatchRow, RowCache};
use mezo_server::engine::llama::{log_softmax, Llama};
use mezo_server::engine::weights::WeightMode;

/// Runs every golden case as one row and returns its `[len, vocab]` log-probs.
fn case_logprobs(model: &Llama, ids: &[u32]) -> Tensor {
    let mut rows = [BatchRow::all_logits(ids, RowCache::None, None)];
    let logits = model.forward(&mut rows).expect("forward")[0]
        .take()
        .expect("logits were requested");
    log_softmax(&logits).expect("log_softmax")
}

/// Checks every case whose length passes `select` against the reference.
fn check_against_golden(model: &Llama, tolerance: f32, select: impl Fn(usize) -> bool) {
    let golden = common::golden();
    for case in golden["cases"].as_array().expect("cases") {
        let ids = common::ids_of(case, "ids");
        if !select(ids.len()) {
            continue;
        }
        let lp = case_logprobs(model, &ids);
        let expected: Vec<f64> = case["next_token_logprobs"]
            .as_array()
            .expect("next_token_logprobs")
            .iter()
            .map(|v| v.as_f64().expect("number"))
            .collect();
        let mut worst = 0f32;
        for (pos, want) in expected.iter().enumerate() {
            let got = lp
                .i((pos, ids[pos + 1] as usize))
                .and_then(|t| t.to_scalar::<f32>())
                .expect("scalar");
            worst = worst.max((got - *want as f32).abs());
        }
        let top1: Vec<u32> = lp.argmax(1).and_then(|t| t.to_vec1()).expect("argmax");
        for (pos, top5) in case["top5_ids"]
            .as_array()
            .expect("top5")
            .iter()
            .enumerate()
        {
            let want = top5[0].as_u64().expect("id") as u32;
            assert_eq!(top1[pos], want, "top-1 differs at position {pos} of {case}");
        }
        assert!(
            worst <= tolerance,
            "max |Δ logprob| {worst} > {tolerance} on case {}",
            case["text"]
        );
    }
}

#[test]
fn f32_forward_matches_reference_logprobs_and_top1() {
    check_against_golden(&common::load_model(WeightMode::F32), 2e-3, |_| true);
}

#[test]
fn quantized_mode_matches_reference_logprobs_and_top1() {
    // Every product runs the quantized kernels (f32 activations), short rows and long alike.
    let model = common::load_model(WeightMode::Quantized);
    check_against_golden(&model, 2e-3, |_| true);
}
