//! Per-row LoRA on the real model: a batch that mixes adapters gives every row what it gets
//! alone, a zero-B adapter is exactly the base model, and the fast scoring path equals its plain
//! reference twin under mixed adapters.

mod common;

use std::sync::Arc;

use adapters::{LoraAdapter, LoraConfig, TargetModule};
use candle_core::Tensor;
use mezo_server::engine::batch::{BatchRow, RowCache};
use mezo_server::engine::lora::AdapterView;
use mezo_server::engine::scoring::{score_continuations, score_continuations_reference, ScoreItem};
use mezo_server::engine::transformer::{Transformer, PACK_TOKENS};
use mezo_server::engine::weights::WeightMode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// An adapter on `targets` with A and B both random (B non-zero, so it changes the output).
fn random_adapter(model: &Transformer, targets: Vec<TargetModule>, seed: u64) -> Arc<AdapterView> {
    let dims = model.config.dims();
    let config = LoraConfig {
        targets,
        ..LoraConfig::default()
    };
    let mut lora = LoraAdapter::new_initialized(config, dims, seed).expect("adapter");
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
    for layer in lora.layers.values_mut() {
        for b in layer.b.iter_mut() {
            *b = rng.gen_range(-0.02..0.02);
        }
    }
    AdapterView::new(&lora, &dims).expect("view")
}

fn zero_b_adapter(model: &Transformer) -> Arc<AdapterView> {
    let dims = model.config.dims();
    let config = LoraConfig {
        targets: TargetModule::ALL.to_vec(),
        ..LoraConfig::default()
    };
    let lora = LoraAdapter::new_initialized(config, dims, 7).expect("adapter");
    AdapterView::new(&lora, &dims).expect("view")
}

fn logits_alone(model: &Transformer, tokens: &[u32], adapter: Option<&AdapterView>) -> Tensor {
    let mut rows = [BatchRow::all_logits(tokens, RowCache::None, adapter)];
    model
        .forward(&mut rows)
        .expect("forward")
        .remove(0)
        .expect("logits")
}

const PROMPTS: [&[u32]; 4] = [
    &[504, 3575, 282, 4649, 314],
    &[6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8085, 617],
    &[21465, 42, 253],
    &[1604, 3987, 46477, 30, 94, 1116, 44, 2],
];

#[test]
fn mixed_adapter_batch_equals_each_row_alone() {
    let model = common::load_model(WeightMode::F32);
    let qv = random_adapter(&model, vec![TargetModule::Q, TargetModule::V], 1);
    let all = random_adapter(&model, TargetModule::ALL.to_vec(), 2);
    let views: [Option<&AdapterView>; 4] = [Some(&qv), None, Some(&all), Some(&qv)];
    let mut rows: Vec<BatchRow<'_>> = PROMPTS
        .iter()
        .zip(views)
        .map(|(p, v)| BatchRow::all_logits(p, RowCache::None, v))
        .collect();
    let batched = model.forward(&mut rows).expect("forward");
    for ((prompt, view), got) in PROMPTS.iter().zip(views).zip(batched) {
        let alone = logits_alone(&model, prompt, view);
        let diff = common::max_abs_diff(&got.expect("logits"), &alone);
        assert!(diff <= 1e-5, "row differs from running alone by {diff}");
    }
    // The adapters really change the output (or the test above would prove nothing).
    let base = logits_alone(&model, PROMPTS[0], None);
    let adapted = logits_alone(&model, PROMPTS[0], Some(&qv));
    assert!(common::max_abs_diff(&base, &adapted) > 1e-2);
}

#[test]
fn a_batch_of_several_packs_gives_each_row_what_it_gets_alone_bit_for_bit() {
    let model = common::load_model(WeightMode::Quantized);
    let qv = random_adapter(&model, vec![TargetModule::Q, TargetModule::V], 3);
    // Rows of 100 tokens, each prompt's tokens repeated: three packs of PACK_TOKENS, and a row
    // longer than a pack as a pack of its own.
    let long: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| p.iter().copied().cycle().take(100).collect())
        .chain([PROMPTS[1]
            .iter()
            .copied()
            .cycle()
            .take(PACK_TOKENS + 40)
            .collect()])
        .collect();
    let total: usize = long.iter().map(Vec::len).sum();
    assert!(total > 2 * PACK_TOKENS, "the batch spans several packs");
    let views = [Some(&*qv), None, Some(&*qv), None, Some(&*qv)];
    let mut rows: Vec<BatchRow<'_>> = long
        .iter()
        .zip(views)
        .map(|(tokens, view)| BatchRow::all_logits(tokens, RowCache::None, view))
        .collect();
    let batched = model.forward(&mut rows).expect("forward");
    for ((tokens, view), got) in long.iter().zip(views).zip(batched) {
        let alone = logits_alone(&model, tokens, view);
        assert_eq!(common::max_abs_diff(&got.expect("logits"), &alone), 0.0);
    }
}

#[test]
fn zero_b_adapter_is_exactly_the_base_model() {
    let model = common::load_model(WeightMode::F32);
    let zero = zero_b_adapter(&model);
    for prompt in PROMPTS {
        let base = logits_alone(&model, prompt, None);
        let adapted = logits_alone(&model, prompt, Some(&zero));
        assert_eq!(common::max_abs_diff(&base, &adapted), 0.0);
    }
}

#[test]
fn fast_scoring_equals_reference_under_mixed_adapters() {
    let model = common::load_model(WeightMode::F32);
    let qv = random_adapter(&model, vec![TargetModule::Q, TargetModule::V], 3);
    let continuations: Vec<Vec<u32>> = vec![vec![3365], vec![761, 436, 4161], vec![28, 5732]];
    let single: Vec<Vec<u32>> = vec![vec![8180], vec![3102]];
    let items = [
        ScoreItem {
            prompt: PROMPTS[1],
            continuations: &continuations,
            adapter: Some(&qv),
        },
        ScoreItem {
            prompt: PROMPTS[0],
            continuations: &single,
            adapter: None,
        },
        ScoreItem {
            prompt: PROMPTS[2],
            continuations: &continuations,
            adapter: None,
        },
    ];
    let fast = score_continuations(&model, &items).expect("fast");
    let reference = score_continuations_reference(&model, &items).expect("reference");
    assert_eq!(fast.len(), reference.len());
    for (f_item, r_item) in fast.iter().zip(&reference) {
        for (f, r) in f_item.iter().zip(r_item) {
            assert_eq!(f.len(), r.len());
            for (a, b) in f.iter().zip(r) {
                assert!((a - b).abs() <= 1e-4, "fast {a} vs reference {b}");
            }
        }
    }
}

#[test]
fn adapter_for_another_model_shape_is_rejected() {
    let model = common::load_model(WeightMode::Quantized);
    let mut dims = model.config.dims();
    dims.hidden += 64;
    let lora = LoraAdapter::new_initialized(LoraConfig::default(), dims, 1).expect("adapter");
    let err = AdapterView::new(&lora, &model.config.dims()).unwrap_err();
    assert!(err.to_string().contains("adapter"), "{err}");
}
