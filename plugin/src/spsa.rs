//! One MeZO step: the SPSA estimate of the gradient along seeded directions, and the update.
//!
//! For each of the step's seeds: build θ+εz and θ−εz ([`Perturbation::perturbed_pair`]), evaluate
//! the objective under both, and take the projected gradient `g = (L+ − L−)/(2ε)`. With several
//! seeds (n-SPSA) the update averages the q directions, each with its own g. By default both
//! adapters go to the engine in one call ([`EvalMode::OneForward`]), which a batching engine turns
//! into one forward pass; [`EvalMode::TwoForwards`] makes two calls, for engines that cannot mix
//! adapters in a batch and as the reference the batched path is tested against.

use adapters::LoraAdapter;
use serde::{Deserialize, Serialize};

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
        let mut projected_grads = Vec::with_capacity(self.seeds.len());
        let (mut sum_plus, mut sum_minus) = (0.0f64, 0.0f64);
        for &seed in &self.seeds {
            let (plus, minus) = Perturbation::new(seed).perturbed_pair(theta, self.epsilon);
            let (loss_plus, loss_minus) = self.losses(engine, objective, &plus, &minus, batch)?;
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
        })
    }

    /// [`Self::estimate`], then the update of `theta`.
    pub fn run(
        &self,
        engine: &dyn DynEngine,
        objective: &dyn Objective,
        theta: &mut LoraAdapter,
        batch: &[&TrainingExample],
    ) -> Result<StepRecord> {
        let record = self.estimate(engine, objective, theta, batch)?;
        record.apply(theta)?;
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
