//! The forward pass against independent references (HF transformers on the dequantized GGUF),
//! for each architecture: next-token log-probs within 2e-3 and the same top-1 token at every
//! position, in both weight modes; for Gemma 3 also its greedy continuations, which exercise the
//! KV cache, the sliding window and the local/global rotary tables during decode.

mod common;

use std::path::Path;

use candle_core::{IndexOp, Tensor};
use mezo_server::engine::batch::{BatchRow, RowCache};
use mezo_server::engine::generate::{generate, GenerationParams, Sequence, StopConditions};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::sampler::SamplingParams;
use mezo_server::engine::transformer::{log_softmax, Transformer};
use mezo_server::engine::weights::WeightMode;

/// Runs every golden case as one row and returns its `[len, vocab]` log-probs.
fn case_logprobs(model: &Transformer, ids: &[u32]) -> Tensor {
    let mut rows = [BatchRow::all_logits(ids, RowCache::None, None)];
    let logits = model.forward(&mut rows).expect("forward")[0]
        .take()
        .expect("logits were requested");
    log_softmax(&logits).expect("log_softmax")
}

/// Checks every case of a reference fixture against the model.
fn check_against_golden(model: &Transformer, golden: &serde_json::Value, tolerance: f32) {
    for case in golden["cases"].as_array().expect("cases") {
        let ids = common::ids_of(case, "ids");
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
            assert_eq!(
                top1[pos], want,
                "top-1 differs at position {pos} of {}",
                case["text"]
            );
        }
        assert!(
            worst <= tolerance,
            "max |Δ logprob| {worst} > {tolerance} on case {}",
            case["text"]
        );
    }
}

/// Greedy continuations of the fixture's text cases, tokenized by the model's own tokenizer.
fn check_greedy_text_cases(path: &Path, mode: WeightMode, golden: &serde_json::Value) {
    let model = LoadedModel::load(path, mode).expect("load");
    for case in golden["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        let prompt = model.tokenizer.encode_prompt(text);
        assert_eq!(prompt, common::ids_of(case, "ids"), "{text:?}");
        let want = common::ids_of(case, "greedy_16");
        let params = GenerationParams {
            max_tokens: want.len(),
            sampling: SamplingParams::greedy(),
            stop: StopConditions::default(),
            top_logprobs: None,
        };
        let mut seqs = [Sequence::new(&model.transformer, prompt, None, params).expect("sequence")];
        generate(&model.transformer, &model.tokenizer, &mut seqs, |_, _| {}).expect("generate");
        assert_eq!(
            seqs[0].generated(),
            want.as_slice(),
            "greedy after {text:?}"
        );
    }
}

#[test]
fn smollm2_f32_forward_matches_reference_logprobs_and_top1() {
    let model = common::load_model(WeightMode::F32);
    check_against_golden(&model, &common::golden(), 2e-3);
}

#[test]
fn smollm2_quantized_forward_matches_reference_logprobs_and_top1() {
    // Every product runs the quantized kernels (f32 activations), short rows and long alike.
    let model = common::load_model(WeightMode::Quantized);
    check_against_golden(&model, &common::golden(), 2e-3);
}

#[test]
fn gemma3_f32_forward_matches_reference_logprobs_and_top1() {
    // The 859-token case runs past the 512-token sliding window of the local layers.
    let model = common::load_model_at(&common::gemma_model_path(), WeightMode::F32);
    check_against_golden(&model, &common::gemma_golden(), 2e-3);
}

#[test]
fn gemma3_quantized_forward_matches_reference_logprobs_and_top1() {
    let model = common::load_model_at(&common::gemma_model_path(), WeightMode::Quantized);
    check_against_golden(&model, &common::gemma_golden(), 2e-3);
}

#[test]
fn gemma3_greedy_continuations_match_the_reference() {
    let path = common::gemma_model_path();
    check_greedy_text_cases(&path, WeightMode::Quantized, &common::gemma_golden());
}
