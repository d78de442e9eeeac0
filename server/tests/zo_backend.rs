//! The engine as MeZO sees it: evaluating θ+εz and θ−εz as rows of one batch gives exactly what
//! two separate evaluations give, for scoring and for greedy decoding; and a job's view of it
//! through the engine thread (background work run in slices between serving steps) gives what
//! the model gives when called directly.

mod common;

use std::sync::Arc;

use adapters::{LoraAdapter, LoraConfig};
use mezo_server::engine::frozen_layers::FrozenStatesBudget;
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;
use mezo_server::engine::zo_backend::ReusingEngine;
use mezo_server::scheduler::{BatchLimits, Scheduler};
use mezo_server::training::QueuedEngine;
use plugin::{ScoreRequest, ZoEngine};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn perturbed_pair(model: &LoadedModel) -> (LoraAdapter, LoraAdapter) {
    perturbed_pair_of(model, LoraConfig::default())
}

fn perturbed_pair_of(model: &LoadedModel, config: LoraConfig) -> (LoraAdapter, LoraAdapter) {
    let dims = model.transformer.config.dims();
    let base = LoraAdapter::new_initialized(config, dims, 5).expect("adapter");
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let mut plus = base.clone();
    let mut minus = base;
    for (p, m) in plus.params_mut().zip(minus.params_mut()) {
        for (x, y) in p.iter_mut().zip(m.iter_mut()) {
            let z: f32 = rng.gen_range(-1.0..1.0);
            *x += 0.05 * z;
            *y -= 0.05 * z;
        }
    }
    (plus, minus)
}

#[test]
fn one_batched_evaluation_equals_two_separate_ones() {
    let model = LoadedModel::load(&common::model_path(), WeightMode::F32).expect("load");
    let (plus, minus) = perturbed_pair(&model);
    let items = common::sentiment_items(
        &model,
        &[
            "Review: a gorgeous, witty film.\nSentiment:",
            "Review: a mess.\nSentiment:",
        ],
    );
    let both = model.score(&[&plus, &minus], &items).expect("score");
    let alone_plus = model.score(&[&plus], &items).expect("score");
    let alone_minus = model.score(&[&minus], &items).expect("score");
    assert_eq!(both.len(), 2);
    for (batched, alone) in both.iter().zip([&alone_plus[0], &alone_minus[0]]) {
        for (b_item, a_item) in batched.iter().zip(alone) {
            for (b, a) in b_item.iter().zip(a_item) {
                for (x, y) in b.iter().zip(a) {
                    assert!((x - y).abs() <= 1e-5, "{x} vs {y}");
                }
            }
        }
    }
    assert_ne!(
        both[0], both[1],
        "the two perturbations must score differently"
    );

    let prompts = vec![model.tokenize("The capital of France is", false)];
    let texts = model
        .generate_greedy(&[&plus, &minus], &prompts, 8)
        .expect("generate");
    assert_eq!(
        texts[0],
        model
            .generate_greedy(&[&plus], &prompts, 8)
            .expect("generate")[0]
    );
    assert_eq!(
        texts[1],
        model
            .generate_greedy(&[&minus], &prompts, 8)
            .expect("generate")[0]
    );
}

#[test]
fn background_work_on_the_engine_thread_gives_what_the_model_gives_directly() {
    let model =
        Arc::new(LoadedModel::load(&common::model_path(), WeightMode::Quantized).expect("load"));
    let (plus, minus) = perturbed_pair(&model);
    // Slices of 16 tokens: every piece of work below takes several, and the longest prompt is
    // longer than a slice.
    let limits = BatchLimits {
        max_batch_rows: 8,
        max_prefill_tokens_per_step: 512,
        prefix_cache_bytes: 0,
        max_training_share: 0.5,
        training_slice_tokens: 16,
        idle_training_slice_tokens: 16,
    };
    let scheduler = Scheduler::start(Arc::clone(&model), limits, 16);
    let budget = FrozenStatesBudget::new(64 << 20);
    let queued = QueuedEngine::new(
        Arc::clone(&model),
        scheduler.handle().clone(),
        Arc::clone(&budget),
    );

    let prompts: Vec<Vec<u32>> = [
        "The capital of France is",
        "Question: what colour is the sky on a clear day? Answer in one word.\nAnswer:",
        "1, 2, 3,",
    ]
    .iter()
    .map(|p| model.tokenize(p, false))
    .collect();
    assert!(prompts
        .iter()
        .any(|p| p.len() > limits.training_slice_tokens));
    let adapters = [&plus, &minus];
    assert_eq!(
        queued
            .generate_greedy(&adapters, &prompts, 10)
            .expect("queued greedy"),
        model
            .generate_greedy(&adapters, &prompts, 10)
            .expect("direct greedy")
    );

    let items: Vec<ScoreRequest> = prompts
        .iter()
        .map(|prompt| ScoreRequest {
            prompt: prompt.clone(),
            continuations: vec![
                model.tokenize(" Paris", false),
                model.tokenize(" blue sky", false),
            ],
        })
        .collect();
    let queued_scores = queued.score(&adapters, &items).expect("queued score");
    let direct_scores = model.score(&adapters, &items).expect("direct score");
    assert_eq!(queued_scores.len(), direct_scores.len());
    for (q, d) in queued_scores
        .iter()
        .flatten()
        .zip(direct_scores.iter().flatten())
    {
        for (q, d) in q.iter().flatten().zip(d.iter().flatten()) {
            assert!((q - d).abs() <= 1e-5, "{q} vs {d}");
        }
    }
    scheduler.close();
    scheduler.join();
}

fn assert_scores_close(got: &plugin::LogProbs, want: &plugin::LogProbs) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert_eq!(g.len(), w.len());
        for (g, w) in g.iter().flatten().zip(w.iter().flatten()) {
            assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
        }
    }
}

#[test]
fn adapters_of_the_top_layers_reuse_the_frozen_layers_on_both_paths() {
    let model =
        Arc::new(LoadedModel::load(&common::model_path(), WeightMode::Quantized).expect("load"));
    let top_ten = LoraConfig {
        layers: Some((20..30).collect()),
        ..LoraConfig::default()
    };
    let (plus, minus) = perturbed_pair_of(&model, top_ten);
    let adapters = [&plus, &minus];
    let mut items = common::sentiment_items(
        &model,
        &[
            "Review: a gorgeous, witty film.\nSentiment:",
            "Review: a mess.\nSentiment:",
        ],
    );
    items[1]
        .continuations
        .push(model.tokenize(" mixed feelings", false));
    let full = model.score(&adapters, &items).expect("full forward");

    let budget = FrozenStatesBudget::new(64 << 20);
    let direct = ReusingEngine::new(&model, Arc::clone(&budget));
    for _ in 0..2 {
        assert_scores_close(&direct.score(&adapters, &items).expect("direct"), &full);
    }
    assert!(direct.frozen_states_bytes() > 0);
    drop(direct);

    let limits = BatchLimits {
        max_batch_rows: 8,
        max_prefill_tokens_per_step: 512,
        prefix_cache_bytes: 0,
        max_training_share: 0.5,
        training_slice_tokens: 16,
        idle_training_slice_tokens: 16,
    };
    let scheduler = Scheduler::start(Arc::clone(&model), limits, 16);
    let queued = QueuedEngine::new(
        Arc::clone(&model),
        scheduler.handle().clone(),
        Arc::clone(&budget),
    );
    for _ in 0..2 {
        assert_scores_close(&queued.score(&adapters, &items).expect("queued"), &full);
    }
    assert!(queued.frozen_states_bytes() > 0);
    assert_eq!(budget.used_bytes(), queued.frozen_states_bytes());
    drop(queued);
    assert_eq!(budget.used_bytes(), 0, "the job's states are given back");
    scheduler.close();
    scheduler.join();
}
