//! The engine as MeZO sees it: evaluating θ+εz and θ−εz as rows of one batch gives exactly what
//! two separate evaluations give, for scoring and for greedy decoding.

mod common;

use adapters::{LoraAdapter, LoraConfig};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;
use plugin::{ScoreRequest, ZoEngine};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn perturbed_pair(model: &LoadedModel) -> (LoraAdapter, LoraAdapter) {
    let dims = model.llama.config.dims();
    let base = LoraAdapter::new_initialized(LoraConfig::default(), dims, 5).expect("adapter");
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
    let items: Vec<ScoreRequest> = [
        "Review: a gorgeous, witty film.\nSentiment:",
        "Review: a mess.\nSentiment:",
    ]
    .iter()
    .map(|p| ScoreRequest {
        prompt: model.tokenize(p, false),
        continuations: vec![
            model.tokenize(" negative", false),
            model.tokenize(" positive", false),
        ],
    })
    .collect();
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
