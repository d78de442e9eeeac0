//! Frozen-layer reuse on the real model: scoring from hidden states kept at the first adapted
//! layer gives what the full forward gives, the second time without computing the frozen
//! layers again, and within its memory budget.

mod common;

use std::sync::Arc;

use adapters::{LoraAdapter, LoraConfig};
use candle_core::{Device, Tensor};
use mezo_server::engine::batch::{BatchRow, RowCache};
use mezo_server::engine::frozen_layers::{FrozenStates, FrozenStatesBudget, ReuseCounts};
use mezo_server::engine::lora::AdapterView;
use mezo_server::engine::scoring::{
    score_continuations, score_continuations_reusing, ContinuationLogprobs, ScoreItem,
};
use mezo_server::engine::transformer::{Start, Transformer};
use mezo_server::engine::weights::WeightMode;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A q/v adapter of `layers` only, with B random so that it changes the output.
fn adapter_of_layers(
    model: &Transformer,
    layers: Option<Vec<usize>>,
    seed: u64,
) -> Arc<AdapterView> {
    let dims = model.config.dims();
    let config = LoraConfig {
        layers,
        ..LoraConfig::default()
    };
    let mut lora = LoraAdapter::new_initialized(config, dims, seed).expect("adapter");
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1000);
    for layer in lora.layers.values_mut() {
        for b in layer.b.iter_mut() {
            *b = rng.gen_range(-0.05..0.05);
        }
    }
    AdapterView::new(&lora, &dims).expect("view")
}

const PROMPTS: [&[u32]; 3] = [
    &[504, 3575, 282, 4649, 314],
    &[6403, 1980, 253, 655, 28, 665, 436, 253, 1838, 8085, 617],
    &[21465, 42, 253],
];

fn assert_close(got: &ContinuationLogprobs, want: &ContinuationLogprobs) {
    assert_eq!(got.len(), want.len());
    for (g_item, w_item) in got.iter().zip(want) {
        assert_eq!(g_item.len(), w_item.len());
        for (g, w) in g_item.iter().zip(w_item) {
            assert_eq!(g.len(), w.len());
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-5, "reused {a} vs full forward {b}");
            }
        }
    }
}

#[test]
fn scoring_from_kept_states_equals_the_full_forward() {
    let model = common::load_model(WeightMode::Quantized);
    let top_ten: Vec<usize> = (20..30).collect();
    let plus = adapter_of_layers(&model, Some(top_ten.clone()), 1);
    let minus = adapter_of_layers(&model, Some(top_ten), 2);
    assert_eq!(plus.first_adapted_layer(), 20);
    let single: Vec<Vec<u32>> = vec![vec![8180], vec![3102]];
    let longer: Vec<Vec<u32>> = vec![vec![3365], vec![761, 436, 4161], vec![28, 5732]];
    // θ+εz and θ−εz rows of the same examples, as a MeZO step sends them, one of them with
    // continuations longer than a token (the cached-prefix phase).
    let items: Vec<ScoreItem<'_>> = [&plus, &minus]
        .into_iter()
        .flat_map(|view| {
            [
                ScoreItem {
                    prompt: PROMPTS[0],
                    continuations: &single,
                    adapter: Some(view),
                },
                ScoreItem {
                    prompt: PROMPTS[1],
                    continuations: &longer,
                    adapter: Some(view),
                },
            ]
        })
        .collect();
    let full = score_continuations(&model, &items).expect("full forward");
    assert_ne!(full[0], full[2], "the two adapters must score differently");

    let budget = FrozenStatesBudget::new(64 << 20);
    let mut frozen = FrozenStates::new(Arc::clone(&budget));
    let first = score_continuations_reusing(&model, &items, &mut frozen).expect("first");
    assert_close(&first, &full);
    let after_first = frozen.counts();
    assert_eq!(after_first.reused_tokens, 0);
    assert!(after_first.computed_tokens > 0);
    assert!(frozen.held_bytes() > 0);
    assert_eq!(budget.used_bytes(), frozen.held_bytes());

    let second = score_continuations_reusing(&model, &items, &mut frozen).expect("second");
    assert_eq!(
        second, first,
        "kept states must give the same scores bit for bit"
    );
    let after_second = frozen.counts();
    assert_eq!(
        after_second.computed_tokens, after_first.computed_tokens,
        "nothing is computed again"
    );
    assert_eq!(after_second.reused_tokens, after_first.computed_tokens);

    drop(frozen);
    assert_eq!(
        budget.used_bytes(),
        0,
        "a job's states are given back when it ends"
    );
}

#[test]
fn states_over_the_budget_are_recomputed_not_kept() {
    let model = common::load_model(WeightMode::Quantized);
    let view = adapter_of_layers(&model, Some(vec![12, 20]), 3);
    let single: Vec<Vec<u32>> = vec![vec![8180], vec![3102]];
    let items: Vec<ScoreItem<'_>> = PROMPTS
        .iter()
        .map(|prompt| ScoreItem {
            prompt,
            continuations: &single,
            adapter: Some(&view),
        })
        .collect();
    let full = score_continuations(&model, &items).expect("full forward");
    // Room for the shortest prompt's states only.
    let bytes_per_token = model.config.hidden * 4;
    let budget = FrozenStatesBudget::new(PROMPTS[2].len() * bytes_per_token);
    let mut frozen = FrozenStates::new(Arc::clone(&budget));
    for _ in 0..2 {
        let got = score_continuations_reusing(&model, &items, &mut frozen).expect("scores");
        assert_close(&got, &full);
        assert!(budget.used_bytes() <= budget.limit_bytes());
    }
    let counts = frozen.counts();
    let all_tokens: usize = PROMPTS.iter().map(|p| p.len()).sum();
    assert!(
        counts.computed_tokens as usize >= all_tokens + PROMPTS[0].len(),
        "{counts:?}"
    );
    assert!(counts.reused_tokens > 0, "{counts:?}");
}

#[test]
fn adapters_of_every_layer_and_the_base_model_need_no_states() {
    let model = common::load_model(WeightMode::Quantized);
    let every = adapter_of_layers(&model, None, 4);
    let single: Vec<Vec<u32>> = vec![vec![8180], vec![3102]];
    let items = [
        ScoreItem {
            prompt: PROMPTS[0],
            continuations: &single,
            adapter: Some(&every),
        },
        ScoreItem {
            prompt: PROMPTS[1],
            continuations: &single,
            adapter: None,
        },
    ];
    let mut frozen = FrozenStates::new(FrozenStatesBudget::new(64 << 20));
    let got = score_continuations_reusing(&model, &items, &mut frozen).expect("scores");
    assert_eq!(got, score_continuations(&model, &items).expect("full"));
    assert_eq!(frozen.counts(), ReuseCounts::default());
    assert_eq!(frozen.held_bytes(), 0);
}

#[test]
fn hidden_states_that_do_not_fit_the_batch_are_refused() {
    let model = common::load_model(WeightMode::Quantized);
    let hidden = Tensor::zeros(
        (4, model.config.hidden),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .expect("zeros");
    let mut rows = [BatchRow::last_logits(PROMPTS[0], RowCache::None, None)];
    let err = model
        .forward_from(&mut rows, Start::Layer { layer: 10, hidden })
        .expect_err("5 tokens cannot start from 4 hidden states");
    assert!(err.to_string().contains("do not fit"), "{err}");
}
