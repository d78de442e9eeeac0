//! The SPSA estimate against the true gradient, on the tiny model (candle autograd).
//!
//! E[g·z] = ∇L for z ~ N(0, I) (up to O(ε²)), so the mean of g·z over many seeds must point along
//! ∇L. How close it gets is known: with ĝ = (1/N)·Σ (zᵢ·∇)·zᵢ and u = ∇/|∇|, the component of ĝ
//! along u is |∇|·(1/N)·Σ (zᵢ·u)² ≈ |∇| (± √(2/N)), and the orthogonal remainder has expected
//! squared norm |∇|²·(d−1)/N. So cos(ĝ, ∇) ≈ 1/√(1 + (d−1)/N) = √(N/(N+d−1)).
//! Here d = 128 (rank 4 on q and v of hidden 8: 2 × (4·8 + 8·4)) and N = 2000: cos ≈ 0.9697.
//! The squared norm of the remainder is (d−1)/N ≈ 0.064 with a relative spread of about
//! √(2/(d−1)) ≈ 12%; the bound 0.95 allows it to be 1.7× its expectation (≈ 6 spreads), while
//! an estimator whose update direction were not the perturbation's z (or whose g had the wrong
//! sign) would give cos ≈ ±1/√d ≈ ±0.09 (or −0.97).

use plugin::objectives::Completion;
use plugin::perturbation::Perturbation;
use plugin::{EvalMode, Objective, SpsaStep, TrainingExample};

use crate::tiny_model::{adapter_with_nonzero_b, encode, LoraTensors, TinyModel};

pub fn completion_examples() -> Vec<TrainingExample> {
    [("abc", "de"), ("hello", "o"), ("fig", "cab"), ("an", "kol")]
        .into_iter()
        .map(|(prompt, completion)| TrainingExample::Completion {
            prompt: prompt.into(),
            completion: completion.into(),
        })
        .collect()
}

fn token_pairs(examples: &[TrainingExample]) -> Vec<(Vec<u32>, Vec<u32>)> {
    examples
        .iter()
        .map(|example| match example {
            TrainingExample::Completion { prompt, completion } => {
                (encode(prompt), encode(completion))
            }
            other => panic!("not a completion example: {other:?}"),
        })
        .collect()
}

/// z of `seed`, flattened in `params()` order like the gradient.
fn flat_direction(seed: u64, len_per_tensor: &[usize]) -> Vec<f64> {
    len_per_tensor
        .iter()
        .enumerate()
        .flat_map(|(index, &len)| {
            Perturbation::new(seed)
                .noise(index)
                .take(len)
                .map(f64::from)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt())
}

#[test]
fn averaged_projected_gradients_point_along_the_true_gradient() {
    let model = TinyModel::new(1);
    let theta = adapter_with_nonzero_b(2);
    let examples = completion_examples();
    let batch: Vec<_> = examples.iter().collect();
    let items = token_pairs(&examples);
    let d = theta.num_params();
    assert_eq!(d, 128);

    // The autograd loss is the objective's loss: same function, same value.
    let autograd_loss = model
        .completion_loss(&items, &LoraTensors::from_adapter(&theta))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let objective_loss = Completion.losses(&model, &[&theta], &batch).unwrap()[0];
    assert!(
        (f64::from(autograd_loss) - objective_loss).abs() < 1e-5,
        "{autograd_loss} vs {objective_loss}"
    );

    let gradient: Vec<f64> = model
        .completion_gradient(&items, &theta)
        .into_iter()
        .map(f64::from)
        .collect();
    let lens: Vec<usize> = theta.params().map(<[f32]>::len).collect();
    let n = 2000u64;
    let mut estimate = vec![0f64; d];
    let mut unrelated = vec![0f64; d];
    for seed in 0..n {
        let step = SpsaStep {
            step: seed,
            seeds: vec![seed],
            epsilon: 1e-3,
            lr: 1e-3,
            weight_decay: 0.0,
            max_projected_grad: None,
            eval_mode: EvalMode::OneForward,
        };
        let g = f64::from(
            step.estimate(&model, &Completion, &theta, &batch)
                .unwrap()
                .projected_grads[0],
        );
        let z = flat_direction(seed, &lens);
        let other_z = flat_direction(seed + n, &lens);
        for j in 0..d {
            estimate[j] += g * z[j] / n as f64;
            unrelated[j] += g * other_z[j] / n as f64;
        }
    }
    let cos = cosine(&estimate, &gradient);
    assert!(
        cos > 0.95,
        "cos(ĝ, ∇L) = {cos}, expected ≈ √(N/(N+d−1)) = 0.97"
    );
    // E[ĝ] = ∇L, not a multiple of it: the projection of ĝ on ∇L is |∇L|² (± √(2/N) ≈ 3%).
    let scale = dot(&estimate, &gradient) / dot(&gradient, &gradient);
    assert!((scale - 1.0).abs() < 0.15, "ĝ·∇/|∇|² = {scale}");
    // The bound separates: g times a direction it was not measured along is noise.
    let unrelated_cos = cosine(&unrelated, &gradient);
    assert!(unrelated_cos.abs() < 0.3, "unrelated cos {unrelated_cos}");
}
