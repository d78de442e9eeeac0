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
//!
//! The optimizers are held to the same bound: the sum of their N updates, fed the same N
//! projected gradients at a fixed θ, must point along −∇L. Momentum's updates are exponential
//! averages of the estimates, so their sum is the sum of the estimates up to the last few terms;
//! Adam divides each element by √v̂ ≈ the spread of g·zⱼ, which is about |∇| for every element,
//! so its sum too is the estimates' sum rescaled. With only the B tensors perturbed, the estimate
//! must point along the B part of ∇L (d = 64, cos ≈ 0.985) and A must not move.
//!
//! The estimators and optimizers that change the directions themselves are run as steps at the
//! fixed θ, the state moving on: P-RGE's split batch, FZOO's normalised one-sided differences,
//! and ConMeZO, whose mean g·z must be the gradient stretched along the momentum it samples
//! around.

use adapters::LoraAdapter;
use plugin::objectives::Completion;
use plugin::perturbation::Perturbation;
use plugin::{
    Estimator, EvalMode, Objective, Optimizer, OptimizerState, SpsaStep, TrainedTensors,
    TrainingExample,
};

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

/// What N steps at a fixed θ measure: the true gradient, and per seed its projected gradient.
struct Measured {
    theta: LoraAdapter,
    gradient: Vec<f64>,
    projected: Vec<(u64, f32)>,
}

const N: u64 = 2000;

fn measure(trained_tensors: TrainedTensors) -> Measured {
    let model = TinyModel::new(1);
    let theta = adapter_with_nonzero_b(2);
    let examples = completion_examples();
    let batch: Vec<_> = examples.iter().collect();
    let items = token_pairs(&examples);
    assert_eq!(theta.num_params(), 128);

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
    let state = OptimizerState::new(Optimizer::Sgd, trained_tensors);
    let projected = (0..N)
        .map(|seed| {
            let step = SpsaStep {
                step: seed,
                seeds: vec![seed],
                epsilon: 1e-3,
                lr: 1e-3,
                weight_decay: 0.0,
                max_projected_grad: None,
                eval_mode: EvalMode::OneForward,
                estimator: Estimator::Central,
                split_batch: false,
            };
            let record = step
                .estimate(&model, &Completion, &theta, &state, &batch)
                .unwrap();
            (seed, record.projected_grads[0])
        })
        .collect();
    Measured {
        theta,
        gradient,
        projected,
    }
}

/// The elements of `values` (flattened in `params()` order) in the tensors `trained` covers.
fn trained_part(values: &[f64], lens: &[usize], trained: TrainedTensors) -> Vec<f64> {
    let mut offset = 0;
    let mut part = Vec::new();
    for (index, &len) in lens.iter().enumerate() {
        if trained.includes(index) {
            part.extend_from_slice(&values[offset..offset + len]);
        }
        offset += len;
    }
    part
}

#[test]
fn averaged_projected_gradients_point_along_the_true_gradient() {
    let Measured {
        theta,
        gradient,
        projected,
    } = measure(TrainedTensors::All);
    let d = theta.num_params();
    let lens: Vec<usize> = theta.params().map(<[f32]>::len).collect();
    let mut estimate = vec![0f64; d];
    let mut unrelated = vec![0f64; d];
    for &(seed, g) in &projected {
        let g = f64::from(g);
        let z = flat_direction(seed, &lens);
        let other_z = flat_direction(seed + N, &lens);
        for j in 0..d {
            estimate[j] += g * z[j] / N as f64;
            unrelated[j] += g * other_z[j] / N as f64;
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

/// −(the sum of the optimizer's N updates), fed the measured projected gradients in order: the
/// displacement of an adapter that starts at zero with lr 1, flattened.
fn summed_updates(measured: &Measured, optimizer: Optimizer, trained: TrainedTensors) -> Vec<f64> {
    let mut moved = measured.theta.clone();
    for values in moved.params_mut() {
        values.fill(0.0);
    }
    let mut state = OptimizerState::new(optimizer, trained);
    for &(seed, g) in &measured.projected {
        state.apply(&mut moved, &[(seed, g)], 1.0 / N as f32, 0.0);
    }
    moved.params().flatten().map(|v| -f64::from(*v)).collect()
}

#[test]
fn every_optimizer_moves_along_the_true_gradient() {
    let measured = measure(TrainedTensors::All);
    let optimizers = [
        Optimizer::Sgd,
        Optimizer::Momentum { beta: 0.9 },
        Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        },
    ];
    for optimizer in optimizers {
        let direction = summed_updates(&measured, optimizer, TrainedTensors::All);
        let cos = cosine(&direction, &measured.gradient);
        assert!(cos > 0.9, "{optimizer:?}: cos(Σu, ∇L) = {cos}");
    }
}

#[test]
fn lora_b_estimates_point_along_the_gradient_of_b_and_leave_a_alone() {
    let measured = measure(TrainedTensors::LoraB);
    let lens: Vec<usize> = measured.theta.params().map(<[f32]>::len).collect();
    let b_gradient = trained_part(&measured.gradient, &lens, TrainedTensors::LoraB);
    assert_eq!(b_gradient.len(), 64);
    for optimizer in [Optimizer::Sgd, Optimizer::Momentum { beta: 0.9 }] {
        let direction = summed_updates(&measured, optimizer, TrainedTensors::LoraB);
        let a_moved =
            direction
                .iter()
                .zip(lens.iter().enumerate().flat_map(|(i, &len)| {
                    std::iter::repeat_n(TrainedTensors::LoraB.includes(i), len)
                }))
                .any(|(v, trained)| !trained && *v != 0.0);
        assert!(!a_moved, "{optimizer:?} moved A");
        let b_direction = trained_part(&direction, &lens, TrainedTensors::LoraB);
        let cos = cosine(&b_direction, &b_gradient);
        assert!(
            cos > 0.95,
            "{optimizer:?}: cos(Σu_B, ∇_B L) = {cos}, expected ≈ √(N/(N+63)) = 0.985"
        );
    }
}

/// A step of the tiny model's tests: `seeds`, ε 1e-3, `estimator`, the batch split or not.
fn spsa_step(step: u64, seeds: Vec<u64>, estimator: Estimator, split_batch: bool) -> SpsaStep {
    SpsaStep {
        step,
        seeds,
        epsilon: 1e-3,
        lr: 1e-3,
        weight_decay: 0.0,
        max_projected_grad: None,
        eval_mode: EvalMode::OneForward,
        estimator,
        split_batch,
    }
}

/// Steps estimated at one fixed θ of the tiny model, their updates collected by an adapter that
/// starts at zero while the optimizer's state moves on as in a run.
struct FixedTheta {
    model: TinyModel,
    theta: LoraAdapter,
    examples: Vec<TrainingExample>,
    /// ∇L at θ on all the examples, flattened.
    gradient: Vec<f64>,
}

impl FixedTheta {
    fn new() -> Self {
        let model = TinyModel::new(1);
        let theta = adapter_with_nonzero_b(2);
        let examples = completion_examples();
        let gradient = model
            .completion_gradient(&token_pairs(&examples), &theta)
            .into_iter()
            .map(f64::from)
            .collect();
        Self {
            model,
            theta,
            examples,
            gradient,
        }
    }

    fn estimate(&self, step: &SpsaStep, state: &OptimizerState) -> plugin::StepRecord {
        let batch: Vec<_> = self.examples.iter().collect();
        step.estimate(&self.model, &Completion, &self.theta, state, &batch)
            .unwrap()
    }

    /// −(the sum of the updates of `steps`), flattened; `inspect` sees each record and the state
    /// after it.
    fn summed_updates(
        &self,
        state: &mut OptimizerState,
        steps: impl Iterator<Item = SpsaStep>,
        mut inspect: impl FnMut(&plugin::StepRecord, &OptimizerState),
    ) -> Vec<f64> {
        let mut moved = zeros_like(&self.theta);
        for step in steps {
            let record = self.estimate(&step, state);
            record.apply(&mut moved, state).unwrap();
            inspect(&record, state);
        }
        moved.params().flatten().map(|v| -f64::from(*v)).collect()
    }
}

/// The adapter of `theta`'s shape with every value 0.
fn zeros_like(theta: &LoraAdapter) -> LoraAdapter {
    let mut zeros = theta.clone();
    for values in zeros.params_mut() {
        values.fill(0.0);
    }
    zeros
}

#[test]
fn split_batch_directions_average_to_the_true_gradient() {
    // P-RGE: 4 directions per step, each on one of the 4 examples; 500 steps give 2000
    // directions. Each measures one example's gradient ∇Lᵦ, whose mean is ∇L; the noise grows
    // with r = mean |∇Lᵦ|² / |∇L|², so cos ≈ √(N/(N + (d−1)·r)).
    let fixed = FixedTheta::new();
    let mut state = OptimizerState::new(Optimizer::Sgd, TrainedTensors::All);
    let steps = (0..N / 4).map(|step| {
        let seeds = (0..4).map(|i| step * 4 + i).collect();
        spsa_step(step, seeds, Estimator::Central, true)
    });
    let direction = fixed.summed_updates(&mut state, steps, |_, _| {});
    let d = fixed.theta.num_params();
    assert_eq!(direction.len(), d);
    let per_example_norms: f64 = (0..fixed.examples.len())
        .map(|b| {
            let g: Vec<f64> = fixed
                .model
                .completion_gradient(&token_pairs(&fixed.examples[b..=b]), &fixed.theta)
                .into_iter()
                .map(f64::from)
                .collect();
            dot(&g, &g)
        })
        .sum::<f64>()
        / fixed.examples.len() as f64;
    let r = per_example_norms / dot(&fixed.gradient, &fixed.gradient);
    let expected = (N as f64 / (N as f64 + (d as f64 - 1.0) * r)).sqrt();
    let cos = cosine(&direction, &fixed.gradient);
    assert!(
        cos > expected - 0.04,
        "cos(Σu, ∇L) = {cos}, expected ≈ {expected} (r = {r})"
    );
}

#[test]
fn fzoo_steps_move_along_the_true_gradient() {
    // 500 steps of N = 4 one-sided directions against the baseline L(θ): 2000 directions, each
    // gᵢ = (Lᵢ − L₀)/σ ≈ (zᵢ·∇)/|∇| up to the spread's own noise, so the summed updates point
    // along ∇L about as well as 2000 central differences do (cos ≈ 0.97).
    let fixed = FixedTheta::new();
    let mut state = OptimizerState::new(Optimizer::Sgd, TrainedTensors::All);
    let steps = (0..N / 4).map(|step| {
        let seeds = (0..4).map(|i| step * 4 + i).collect();
        spsa_step(step, seeds, Estimator::Fzoo, false)
    });
    let direction = fixed.summed_updates(&mut state, steps, |record, _| {
        // Normalised: of order 1 whatever the loss's scale, and never beyond 2√N.
        assert!(
            record.projected_grads.iter().all(|g| g.abs() <= 4.0),
            "{record:?}"
        );
    });
    let cos = cosine(&direction, &fixed.gradient);
    assert!(cos > 0.9, "cos(Σu, ∇L) = {cos}");
}

#[test]
fn conmezo_estimates_follow_the_gradient_stretched_along_the_momentum() {
    // With z = cos α·√n·m̂ + sin α·ζ, E[g·z] = E[z zᵀ]·∇L = (sin²α·I + cos²α·n·m̂m̂ᵀ)·∇L. At a
    // fixed θ and a fixed state (m from 50 steps), 2000 seeds must average to that vector (an
    // isotropic z would give ∇L itself, cos ≈ 0.45 with it here), and a run whose state moves on
    // must still step along −∇L.
    let fixed = FixedTheta::new();
    let angle = 1.2f32;
    let mut state =
        OptimizerState::new(Optimizer::ConMezo { beta: 0.9, angle }, TrainedTensors::All);
    let zero = zeros_like(&fixed.theta);
    let n = fixed.theta.num_params();
    let mut checked = false;
    let steps = (0..N).map(|step| spsa_step(step, vec![step], Estimator::Central, false));
    let direction = fixed.summed_updates(&mut state, steps, |record, state| {
        if record.step != 49 {
            return;
        }
        let mut mean = vec![0f64; n];
        for seed in 1_000_000..1_000_000 + N {
            let step = spsa_step(0, vec![seed], Estimator::Central, false);
            let g = f64::from(fixed.estimate(&step, state).projected_grads[0]);
            let z = state.perturbed(&zero, state.directions(&[seed])[0], 1.0);
            for (m, z) in mean.iter_mut().zip(z.params().flatten()) {
                *m += g * f64::from(*z) / N as f64;
            }
        }
        // m̂ from one direction: z(seed) − sin α·ζ(seed) = cos α·√n·m̂.
        let z = state.perturbed(&zero, state.directions(&[7])[0], 1.0);
        let plain = OptimizerState::new(Optimizer::Sgd, TrainedTensors::All);
        let zeta = plain.perturbed(&zero, plain.directions(&[7])[0], 1.0);
        let along: Vec<f64> = z
            .params()
            .flatten()
            .zip(zeta.params().flatten())
            .map(|(z, zeta)| f64::from(*z) - f64::from(angle.sin()) * f64::from(*zeta))
            .collect();
        let m_hat: Vec<f64> = along
            .iter()
            .map(|v| v / dot(&along, &along).sqrt())
            .collect();
        let (cos2, sin2) = (
            f64::from(angle.cos()).powi(2),
            f64::from(angle.sin()).powi(2),
        );
        let projection = dot(&m_hat, &fixed.gradient);
        let expected: Vec<f64> = fixed
            .gradient
            .iter()
            .zip(&m_hat)
            .map(|(g, m)| sin2 * g + cos2 * n as f64 * projection * m)
            .collect();
        let cos = cosine(&mean, &expected);
        assert!(cos > 0.9, "cos(mean g·z, E[z zᵀ]·∇L) = {cos}");
        checked = true;
    });
    assert!(checked);
    let cos = cosine(&direction, &fixed.gradient);
    assert!(cos > 0.9, "cos(Σu, ∇L) = {cos}");
}
