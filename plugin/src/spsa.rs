//! One MeZO step: the SPSA estimate of the gradient along seeded directions, and the update.
//!
//! For each of the step's seeds: build θ+εz and θ−εz ([`Perturbation::perturbed_pair`]), evaluate
//! the objective under both, and take the projected gradient `g = (L+ − L−)/(2ε)`. With several
//! seeds (n-SPSA) the update averages the q directions, each with its own g; each direction is
//! evaluated on the whole batch, or, with `split_batch` (P-RGE, arXiv 2409.15520), on its own
//! q-th of it: q directions for the forwards of one. By default both
//! adapters go to the engine in one call ([`EvalMode::OneForward`]), which a batching engine turns
//! into one forward pass; [`EvalMode::TwoForwards`] makes two calls, for engines that cannot mix
//! adapters in a batch and as the reference the batched path is tested against.

use adapters::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::optimizer::{OptimizerState, TrainedTensors};
use crate::perturbation::Perturbation;
use crate::{DynEngine, Objective, Result, StepRecord, TrainError, TrainingExample};

/// How L+ and L− are evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// One engine call with both adapters, `[&plus, &minus]`.
    #[default]
    OneForward,
    /// One engine call per adapter, θ+εz first.
    TwoForwards,
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
    /// The tensors perturbed (the others keep z = 0).
    pub trained_tensors: TrainedTensors,
    /// Each seed's direction is evaluated on its own share of the batch (consecutive, equal
    /// shares) instead of on all of it.
    pub split_batch: bool,
}

impl SpsaStep {
    /// Evaluates the perturbed losses and returns the step's record, leaving `theta` unchanged;
    /// [`StepRecord::apply`] then performs the update.
    pub fn estimate(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        theta: &LoraAdapter,
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
        let share = if self.split_batch {
            let share = batch.len() / self.seeds.len();
            if share == 0 || share * self.seeds.len() != batch.len() {
                return Err(TrainError::config(
                    "batch_size",
                    format!(
                        "a multiple of n_perturbations ({}) with split_batch",
                        self.seeds.len()
                    ),
                    batch.len(),
                ));
            }
            share
        } else {
            batch.len()
        };
        let mut projected_grads = Vec::with_capacity(self.seeds.len());
        let (mut sum_plus, mut sum_minus) = (0.0f64, 0.0f64);
        for (index, &seed) in self.seeds.iter().enumerate() {
            let examples = if self.split_batch {
                &batch[index * share..(index + 1) * share]
            } else {
                batch
            };
            let (plus, minus) =
                Perturbation::new(seed).perturbed_pair(theta, self.epsilon, self.trained_tensors);
            let (loss_plus, loss_minus) =
                self.losses(engine, objective, &plus, &minus, examples)?;
            if !(loss_plus.is_finite() && loss_minus.is_finite()) {
                return Err(TrainError::NonFiniteLoss {
                    step: self.step,
                    loss_plus,
                    loss_minus,
                });
            }
            let g = ((loss_plus - loss_minus) / (2.0 * f64::from(self.epsilon))) as f32;
            let g = match self.max_projected_grad {
                Some(max) => g.clamp(-max, max),
                None => g,
            };
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
        Ok(StepRecord {
            step: self.step,
            seeds: self.seeds.clone(),
            projected_grads,
            lr: self.lr,
            weight_decay: self.weight_decay,
            loss_plus: (sum_plus / q) as f32,
            loss_minus: (sum_minus / q) as f32,
            optimizer: Default::default(),
            trained_tensors: self.trained_tensors,
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
        let mut record = self.estimate(engine, objective, theta, batch)?;
        record.optimizer = state.optimizer();
        record.apply(theta, state)?;
        Ok(record)
    }

    /// `(L+, L−)` on the batch, in one call or two.
    fn losses(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        plus: &LoraAdapter,
        minus: &LoraAdapter,
        batch: &[&TrainingExample],
    ) -> Result<(f64, f64)> {
        let losses = match self.eval_mode {
            EvalMode::OneForward => objective.losses(engine, &[plus, minus], batch)?,
            EvalMode::TwoForwards => {
                let mut losses = objective.losses(engine, &[plus], batch)?;
                losses.extend(objective.losses(engine, &[minus], batch)?);
                losses
            }
        };
        match losses[..] {
            [loss_plus, loss_minus] => Ok((loss_plus, loss_minus)),
            _ => Err(TrainError::EngineOutput {
                expected: "2 losses (θ+εz, θ−εz)".into(),
                given: format!(
                    "{} losses from objective `{}`",
                    losses.len(),
                    objective.name()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use adapters::{LoraConfig, ModelDims};

    use super::*;
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
            trained_tensors: TrainedTensors::All,
            split_batch: false,
        }
    }

    fn first_z(seed: u64) -> f32 {
        Perturbation::new(seed).noise(0).next().unwrap()
    }

    #[test]
    fn projected_gradient_is_the_central_difference_along_z() {
        let theta = theta();
        let record = step(vec![1, 2], None)
            .estimate(&NoEngine, &Linear { slope: 3.0 }, &theta, &[])
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
            .estimate(&NoEngine, &Linear { slope: 1e3 }, &theta, &[])
            .unwrap();
        let expected: Vec<f32> = (1..=4).map(|s| 0.5 * first_z(s).signum()).collect();
        assert_eq!(record.projected_grads, expected);
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
                &mut OptimizerState::new(Default::default(), TrainedTensors::All),
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
            .estimate(&NoEngine, &recorder, &theta, &batch)
            .unwrap();
        assert_eq!(record.projected_grads.len(), 3);
        assert_eq!(
            *recorder.batches.lock().unwrap(),
            [["p0", "p1"], ["p2", "p3"], ["p4", "p5"]]
        );
        // Shared: every direction sees the whole batch.
        let recorder = BatchRecorder::default();
        step(vec![1, 2], None)
            .estimate(&NoEngine, &recorder, &theta, &batch)
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
        .estimate(&NoEngine, &BatchRecorder::default(), &theta, &batch)
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
            .estimate(&NoEngine, &Linear { slope: 1.0 }, &theta, &[])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`n_perturbations` must be at least 1 (given 0)"
        );
        let err = SpsaStep {
            epsilon: -1.0,
            ..step(vec![1], None)
        }
        .estimate(&NoEngine, &Linear { slope: 1.0 }, &theta, &[])
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "`epsilon` must be a finite number > 0 (given -1)"
        );
    }
}
