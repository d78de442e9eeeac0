//! One MeZO step: the zeroth-order estimate of the gradient along seeded directions.
//!
//! Two estimators ([`Estimator`]), both ending in one projected gradient per direction z (seeded,
//! [`crate::perturbation`]), which the run's optimizer turns into the update
//! ([`crate::optimizer`], through [`StepRecord::apply`]):
//! - **Central** (MeZO's SPSA): evaluate the objective under θ+εz and θ−εz and take
//!   `g = (L+ − L−)/(2ε)`; two evaluations of the batch per direction. With q directions (n-SPSA)
//!   each has its own g and the update averages them. Each direction is evaluated on the whole
//!   batch, or, with `split_batch` (P-RGE, arXiv 2409.15520), on its own q-th of it: q directions
//!   for the tokens of one.
//! - **FZOO** (arXiv 2506.09034): one-sided differences against a shared baseline. Evaluate
//!   L₀ = L(θ) and Lᵢ = L(θ+εzᵢ) for the N directions (N+1 evaluations of the batch) and take
//!   `gᵢ = (Lᵢ − L₀)/σ`, σ the standard deviation of the N+1 losses. The spread of the losses is
//!   ε times the size of the gradient, so dividing by it normalises the step (FZOO is ZO
//!   normalised SGD): each gᵢ is of order 1 whatever the scale of the loss, the update is about
//!   `lr·∇L/|∇L|`, larger than SGD's where the loss is flat and smaller where it is steep. The
//!   spread is taken over the N+1 losses, baseline included, which bounds every |gᵢ| by 2√N even
//!   when all directions change the loss alike. Equal losses (σ = 0, e.g. an accuracy no
//!   direction changes) give g = 0: no update.
//!
//! By default every adapter of a step goes to the engine in one call ([`EvalMode::OneForward`]),
//! which a batching engine turns into one forward pass: `2q` adapters × the batch for the central
//! estimator (q × its q-th with `split_batch`: one call per direction), `N+1` for FZOO.
//! [`EvalMode::TwoForwards`] makes one call per adapter, for engines that cannot mix adapters in a
//! batch and as the reference the batched path is tested against.

use adapters::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::optimizer::OptimizerState;
use crate::{DynEngine, Objective, Result, StepRecord, TrainError, TrainingExample};

/// How the adapters of a step are evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// One engine call with every adapter of the step (per share of the batch with
    /// `split_batch`).
    #[default]
    OneForward,
    /// One engine call per adapter, in the order of the one-call path.
    TwoForwards,
}

/// How a step's losses become projected gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Estimator {
    /// `(L(θ+εz) − L(θ−εz))/(2ε)` per direction: two evaluations per direction.
    #[default]
    Central,
    /// `(L(θ+εzᵢ) − L(θ))/σ`, σ the spread of the N+1 losses: N+1 evaluations for N directions.
    Fzoo,
}

impl Estimator {
    pub fn is_central(&self) -> bool {
        *self == Estimator::Central
    }

    /// Evaluations of the batch (adapters × examples, in units of the batch) per step of `q`
    /// directions.
    pub fn evaluations(self, q: usize, split_batch: bool) -> f64 {
        match (self, split_batch) {
            (Estimator::Central, false) => 2.0 * q as f64,
            (Estimator::Central, true) => 2.0,
            (Estimator::Fzoo, _) => q as f64 + 1.0,
        }
    }
}

/// The number of examples each direction is evaluated on: the whole batch, or its
/// `1/n_perturbations` with `split_batch` (which then needs a batch that splits evenly, and the
/// central estimator: FZOO's directions share one baseline on one batch).
pub fn examples_per_direction(
    estimator: Estimator,
    split_batch: bool,
    batch_size: usize,
    n_perturbations: usize,
) -> Result<usize> {
    if !split_batch {
        return Ok(batch_size);
    }
    if estimator == Estimator::Fzoo {
        return Err(TrainError::config(
            "split_batch",
            "false with the fzoo estimator, whose directions share one baseline on one batch \
             (set estimator to \"central\" to split the batch between directions)",
            true,
        ));
    }
    let share = batch_size / n_perturbations.max(1);
    if share == 0 || share * n_perturbations != batch_size {
        return Err(TrainError::config(
            "batch_size",
            format!("a multiple of n_perturbations ({n_perturbations}) with split_batch"),
            batch_size,
        ));
    }
    Ok(share)
}

/// Everything one step needs besides the engine, the objective, θ and the minibatch.
#[derive(Debug, Clone, PartialEq)]
pub struct SpsaStep {
    /// 0-based index of the step, for the record.
    pub step: u64,
    /// One seed per perturbation; q = `seeds.len()` ≥ 1.
    pub seeds: Vec<u64>,
    /// Perturbation scale ε > 0.
    pub epsilon: f32,
    pub lr: f32,
    pub weight_decay: f32,
    /// When set, each projected gradient is clipped to `[−max, max]` before the update.
    pub max_projected_grad: Option<f32>,
    pub eval_mode: EvalMode,
    pub estimator: Estimator,
    /// Each seed's direction is evaluated on its own share of the batch (consecutive, equal
    /// shares) instead of on all of it.
    pub split_batch: bool,
}

/// The projected gradients of a step and the losses to report.
struct Estimate {
    projected_grads: Vec<f32>,
    loss_plus: f64,
    loss_minus: f64,
}

impl SpsaStep {
    /// Evaluates the perturbed losses and returns the step's record, leaving `theta` and the
    /// run's optimizer `state` unchanged (the state gives the directions and the tensors they
    /// perturb); [`StepRecord::apply`] then performs the update.
    pub fn estimate(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        theta: &LoraAdapter,
        state: &OptimizerState,
        batch: &[&TrainingExample],
    ) -> Result<StepRecord> {
        if self.seeds.is_empty() {
            return Err(TrainError::config("n_perturbations", "at least 1", 0));
        }
        if !(self.epsilon.is_finite() && self.epsilon > 0.0) {
            return Err(TrainError::config(
                "epsilon",
                "a finite number > 0",
                self.epsilon,
            ));
        }
        let share = examples_per_direction(
            self.estimator,
            self.split_batch,
            batch.len(),
            self.seeds.len(),
        )?;
        let mut estimate = match self.estimator {
            Estimator::Central => self.central(engine, objective, theta, state, batch, share)?,
            Estimator::Fzoo => self.fzoo(engine, objective, theta, state, batch)?,
        };
        if let Some(max) = self.max_projected_grad {
            for g in &mut estimate.projected_grads {
                *g = g.clamp(-max, max);
            }
        }
        Ok(StepRecord {
            step: self.step,
            seeds: self.seeds.clone(),
            projected_grads: estimate.projected_grads,
            lr: self.lr,
            weight_decay: self.weight_decay,
            loss_plus: estimate.loss_plus as f32,
            loss_minus: estimate.loss_minus as f32,
            estimator: self.estimator,
            optimizer: state.optimizer(),
            trained_tensors: state.trained(),
        })
    }

    /// [`Self::estimate`], then the update of `theta` by the optimizer of `state`.
    pub fn run(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        theta: &mut LoraAdapter,
        state: &mut OptimizerState,
        batch: &[&TrainingExample],
    ) -> Result<StepRecord> {
        let record = self.estimate(engine, objective, theta, state, batch)?;
        record.apply(theta, state)?;
        Ok(record)
    }

    /// MeZO's central differences, each direction on `share` examples of the batch.
    fn central(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        theta: &LoraAdapter,
        state: &OptimizerState,
        batch: &[&TrainingExample],
        share: usize,
    ) -> Result<Estimate> {
        let pairs: Vec<[LoraAdapter; 2]> = state
            .directions(&self.seeds)
            .into_iter()
            .map(|z| {
                [
                    state.perturbed(theta, z, self.epsilon),
                    state.perturbed(theta, z, -self.epsilon),
                ]
            })
            .collect();
        let losses: Vec<f64> = if self.split_batch {
            let mut losses = Vec::with_capacity(2 * pairs.len());
            for (pair, examples) in pairs.iter().zip(batch.chunks(share)) {
                losses.extend(self.losses(engine, objective, &pair.each_ref(), examples)?);
            }
            losses
        } else {
            let adapters: Vec<&LoraAdapter> = pairs.iter().flatten().collect();
            self.losses(engine, objective, &adapters, batch)?
        };
        let mut projected_grads = Vec::with_capacity(self.seeds.len());
        let (mut sum_plus, mut sum_minus) = (0.0f64, 0.0f64);
        for (&seed, pair) in self.seeds.iter().zip(losses.chunks_exact(2)) {
            let (loss_plus, loss_minus) = (pair[0], pair[1]);
            self.check_finite(loss_plus, loss_minus)?;
            let g = ((loss_plus - loss_minus) / (2.0 * f64::from(self.epsilon))) as f32;
            tracing::debug!(
                step = self.step,
                seed,
                loss_plus,
                loss_minus,
                g,
                "perturbation"
            );
            projected_grads.push(g);
            sum_plus += loss_plus;
            sum_minus += loss_minus;
        }
        let q = self.seeds.len() as f64;
        Ok(Estimate {
            projected_grads,
            loss_plus: sum_plus / q,
            loss_minus: sum_minus / q,
        })
    }

    /// FZOO's one-sided differences against L(θ), normalised by the spread of the losses.
    fn fzoo(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        theta: &LoraAdapter,
        state: &OptimizerState,
        batch: &[&TrainingExample],
    ) -> Result<Estimate> {
        let perturbed: Vec<LoraAdapter> = state
            .directions(&self.seeds)
            .into_iter()
            .map(|z| state.perturbed(theta, z, self.epsilon))
            .collect();
        let adapters: Vec<&LoraAdapter> = std::iter::once(theta).chain(&perturbed).collect();
        let losses = self.losses(engine, objective, &adapters, batch)?;
        // `losses` has one loss per adapter: the baseline, then the N perturbed.
        let (baseline, perturbed_losses) = (losses[0], &losses[1..]);
        for &loss in perturbed_losses {
            self.check_finite(loss, baseline)?;
        }
        let n = losses.len() as f64;
        let mean = losses.iter().sum::<f64>() / n;
        let spread = (losses.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n).sqrt();
        let projected_grads = perturbed_losses
            .iter()
            .zip(&self.seeds)
            .map(|(&loss, &seed)| {
                let g = if spread > 0.0 {
                    ((loss - baseline) / spread) as f32
                } else {
                    0.0
                };
                tracing::debug!(
                    step = self.step,
                    seed,
                    loss,
                    baseline,
                    spread,
                    g,
                    "perturbation"
                );
                g
            })
            .collect();
        Ok(Estimate {
            projected_grads,
            loss_plus: perturbed_losses.iter().sum::<f64>() / perturbed_losses.len() as f64,
            loss_minus: baseline,
        })
    }

    fn check_finite(&self, loss_plus: f64, loss_minus: f64) -> Result<()> {
        if loss_plus.is_finite() && loss_minus.is_finite() {
            Ok(())
        } else {
            Err(TrainError::NonFiniteLoss {
                step: self.step,
                loss_plus,
                loss_minus,
            })
        }
    }

    /// One loss per adapter on `examples`, in one call or one per adapter.
    fn losses(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        adapters: &[&LoraAdapter],
        examples: &[&TrainingExample],
    ) -> Result<Vec<f64>> {
        let losses = match self.eval_mode {
            EvalMode::OneForward => objective.losses(engine, adapters, examples)?,
            EvalMode::TwoForwards => {
                let mut losses = Vec::with_capacity(adapters.len());
                for adapter in adapters {
                    losses.extend(objective.losses(engine, &[adapter], examples)?);
                }
                losses
            }
        };
        if losses.len() != adapters.len() {
            return Err(TrainError::EngineOutput {
                expected: format!("{} losses, one per adapter", adapters.len()),
                given: format!(
                    "{} losses from objective `{}`",
                    losses.len(),
                    objective.name()
                ),
            });
        }
        Ok(losses)
    }
}

#[cfg(test)]
mod tests {
    use adapters::{LoraConfig, ModelDims};

    use super::*;
    use crate::perturbation::Perturbation;
    use crate::{ExampleKind, LogProbs, ScoreRequest, ZoEngine};

    /// L(θ) = slope·θ₀ (θ₀: the adapter's first value), with no engine involved: the projected
    /// gradient is then slope·z₀ up to f32 rounding of θ ± εz.
    struct Linear {
        slope: f64,
    }

    impl Objective for Linear {
        fn name(&self) -> &'static str {
            "linear"
        }

        fn example_kind(&self) -> ExampleKind {
            ExampleKind::Completion
        }

        fn losses(
            &self,
            _: &dyn DynEngine,
            adapters: &[&LoraAdapter],
            _: &[&TrainingExample],
        ) -> Result<Vec<f64>> {
            Ok(adapters
                .iter()
                .map(|a| self.slope * f64::from(a.params().next().map_or(0.0, |p| p[0])))
                .collect())
        }
    }

    /// An engine that is never called.
    struct NoEngine;

    impl ZoEngine for NoEngine {
        type Error = std::fmt::Error;

        fn tokenize(&self, _: &str, _: bool) -> Vec<u32> {
            Vec::new()
        }

        fn score(&self, _: &[&LoraAdapter], _: &[ScoreRequest]) -> Result<LogProbs, Self::Error> {
            Err(std::fmt::Error)
        }

        fn generate_greedy(
            &self,
            _: &[&LoraAdapter],
            _: &[Vec<u32>],
            _: usize,
        ) -> Result<Vec<Vec<String>>, Self::Error> {
            Err(std::fmt::Error)
        }
    }

    fn theta() -> LoraAdapter {
        let dims = ModelDims {
            n_layer: 1,
            hidden: 4,
            n_head: 1,
            n_kv_head: 1,
            head_dim: 4,
            ffn: 4,
            qk_rows: adapters::QkRowOrder::HuggingFace,
        };
        LoraAdapter::new_initialized(LoraConfig::default(), dims, 1).unwrap()
    }

    fn step(seeds: Vec<u64>, max_projected_grad: Option<f32>) -> SpsaStep {
        SpsaStep {
            step: 0,
            seeds,
            epsilon: 1e-2,
            lr: 0.1,
            weight_decay: 0.0,
            max_projected_grad,
            eval_mode: EvalMode::OneForward,
            estimator: Estimator::Central,
            split_batch: false,
        }
    }

    fn sgd() -> OptimizerState {
        OptimizerState::new(crate::Optimizer::Sgd, crate::TrainedTensors::All)
    }

    fn first_z(seed: u64) -> f32 {
        Perturbation::new(seed).noise(0).next().unwrap()
    }

    #[test]
    fn projected_gradient_is_the_central_difference_along_z() {
        let theta = theta();
        let record = step(vec![1, 2], None)
            .estimate(&NoEngine, &Linear { slope: 3.0 }, &theta, &sgd(), &[])
            .unwrap();
        for (g, seed) in record.projected_grads.iter().zip([1, 2]) {
            let expected = 3.0 * first_z(seed);
            assert!(
                (g - expected).abs() < 1e-4 * expected.abs().max(1.0),
                "{g} vs {expected}"
            );
        }
        // Losses are the means over the two seeds of L(θ ± εz) = 3·(θ₀ ± εz₀).
        let theta0 = f64::from(theta.params().next().unwrap()[0]);
        let mean_z = (f64::from(first_z(1)) + f64::from(first_z(2))) / 2.0;
        assert!((f64::from(record.loss_plus) - 3.0 * (theta0 + 1e-2 * mean_z)).abs() < 1e-5);
        assert!((f64::from(record.loss_minus) - 3.0 * (theta0 - 1e-2 * mean_z)).abs() < 1e-5);
    }

    #[test]
    fn clipping_bounds_the_projected_gradient_keeping_its_sign() {
        let theta = theta();
        let record = step(vec![1, 2, 3, 4], Some(0.5))
            .estimate(&NoEngine, &Linear { slope: 1e3 }, &theta, &sgd(), &[])
            .unwrap();
        let expected: Vec<f32> = (1..=4).map(|s| 0.5 * first_z(s).signum()).collect();
        assert_eq!(record.projected_grads, expected);
    }

    fn fzoo(seeds: Vec<u64>) -> SpsaStep {
        SpsaStep {
            estimator: Estimator::Fzoo,
            ..step(seeds, None)
        }
    }

    #[test]
    fn fzoo_divides_one_sided_differences_by_the_spread_of_the_losses() {
        let theta = theta();
        let seeds = vec![1, 2, 3, 4];
        // L(θ+εz) − L(θ) = slope·ε·z₀, so gᵢ = z₀ᵢ / std{0, z₀₁, …, z₀₄} whatever the slope.
        let zs: Vec<f64> = seeds.iter().map(|&s| f64::from(first_z(s))).collect();
        let losses: Vec<f64> = std::iter::once(0.0).chain(zs.iter().copied()).collect();
        let mean = losses.iter().sum::<f64>() / 5.0;
        let spread = (losses.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 5.0).sqrt();
        let theta0 = f64::from(theta.params().next().unwrap()[0]);
        for slope in [3.0, 300.0] {
            let record = fzoo(seeds.clone())
                .estimate(&NoEngine, &Linear { slope }, &theta, &sgd(), &[])
                .unwrap();
            for (g, z) in record.projected_grads.iter().zip(&zs) {
                let expected = z / spread;
                assert!(
                    (f64::from(*g) - expected).abs() < 1e-3 * expected.abs().max(1.0),
                    "slope {slope}: {g} vs {expected}"
                );
                // |Lᵢ − L₀| ≤ 2√N·σ for any N+1 losses.
                assert!(g.abs() <= 4.0, "{g}");
            }
            assert!(
                (f64::from(record.loss_minus) - slope * theta0).abs() < 1e-4 * slope,
                "the baseline is L(θ): {record:?}"
            );
            assert_eq!(record.estimator, Estimator::Fzoo);
        }
        // Losses that no direction changes: no update.
        let record = fzoo(seeds)
            .estimate(&NoEngine, &Linear { slope: 0.0 }, &theta, &sgd(), &[])
            .unwrap();
        assert_eq!(record.projected_grads, [0.0; 4]);
    }

    #[test]
    fn fzoo_does_not_split_the_batch() {
        let err = SpsaStep {
            split_batch: true,
            ..fzoo(vec![1, 2])
        }
        .estimate(&NoEngine, &Linear { slope: 1.0 }, &theta(), &sgd(), &[])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`split_batch` must be false with the fzoo estimator, whose directions share one \
             baseline on one batch (set estimator to \"central\" to split the batch between \
             directions) (given true)"
        );
    }

    #[test]
    fn a_non_finite_loss_stops_the_step_before_theta_moves() {
        let mut theta = theta();
        let before = theta.clone();
        let err = step(vec![1], None)
            .run(
                &NoEngine,
                &Linear { slope: f64::NAN },
                &mut theta,
                &mut sgd(),
                &[],
            )
            .unwrap_err();
        assert!(
            matches!(err, TrainError::NonFiniteLoss { step: 0, .. }),
            "{err}"
        );
        assert_eq!(theta, before);
    }

    /// Records the prompts of every batch it is asked for; the loss is θ₀ as in [`Linear`].
    #[derive(Default)]
    struct BatchRecorder {
        batches: std::sync::Mutex<Vec<Vec<String>>>,
    }

    impl Objective for BatchRecorder {
        fn name(&self) -> &'static str {
            "batch_recorder"
        }

        fn example_kind(&self) -> ExampleKind {
            ExampleKind::Completion
        }

        fn losses(
            &self,
            engine: &dyn DynEngine,
            adapters: &[&LoraAdapter],
            batch: &[&TrainingExample],
        ) -> Result<Vec<f64>> {
            let prompts = batch
                .iter()
                .map(|example| match example {
                    TrainingExample::Completion { prompt, .. } => prompt.clone(),
                    other => format!("{other:?}"),
                })
                .collect();
            self.batches.lock().unwrap().push(prompts);
            Linear { slope: 1.0 }.losses(engine, adapters, batch)
        }
    }

    #[test]
    fn split_batch_gives_each_direction_its_own_share_of_the_batch() {
        let theta = theta();
        let examples: Vec<TrainingExample> = (0..6)
            .map(|i| TrainingExample::Completion {
                prompt: format!("p{i}"),
                completion: "c".into(),
            })
            .collect();
        let batch: Vec<&TrainingExample> = examples.iter().collect();
        let recorder = BatchRecorder::default();
        let split = SpsaStep {
            split_batch: true,
            ..step(vec![1, 2, 3], None)
        };
        let record = split
            .estimate(&NoEngine, &recorder, &theta, &sgd(), &batch)
            .unwrap();
        assert_eq!(record.projected_grads.len(), 3);
        assert_eq!(
            *recorder.batches.lock().unwrap(),
            [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
        );
        // Shared: every direction sees the whole batch.
        let recorder = BatchRecorder::default();
        step(vec![1, 2], None)
            .estimate(&NoEngine, &recorder, &theta, &sgd(), &batch)
            .unwrap();
        assert!(recorder
            .batches
            .lock()
            .unwrap()
            .iter()
            .all(|b| b.len() == 6));
        // A batch that does not split evenly is refused.
        let err = SpsaStep {
            split_batch: true,
            ..step(vec![1, 2, 3, 4], None)
        }
        .estimate(&NoEngine, &BatchRecorder::default(), &theta, &sgd(), &batch)
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`batch_size` must be a multiple of n_perturbations (4) with split_batch (given 6)"
        );
    }

    #[test]
    fn a_step_needs_a_seed_and_a_positive_epsilon() {
        let theta = theta();
        let err = step(vec![], None)
            .estimate(&NoEngine, &Linear { slope: 1.0 }, &theta, &sgd(), &[])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`n_perturbations` must be at least 1 (given 0)"
        );
        let err = SpsaStep {
            epsilon: -1.0,
            ..step(vec![1], None)
        }
        .estimate(&NoEngine, &Linear { slope: 1.0 }, &theta, &sgd(), &[])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`epsilon` must be a finite number > 0 (given -1)"
        );
    }
}
