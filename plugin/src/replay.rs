//! The step log: a whole MeZO run in a few bytes per step, and its bit-exact replay.
//!
//! A step changes θ only through `θ ← θ − lr·(u + wd·θ)`, where `u` is the optimizer's function of
//! `Σᵢ (gᵢ/q)·zᵢ` and of its state, and each zᵢ is a function of its seed (see
//! [`crate::perturbation`], [`crate::optimizer`]). So the initial adapter plus, per step, the
//! seeds, the projected gradients, the learning rate, the weight decay and the optimizer describe
//! the trained adapter completely (MeZO paper §2.1); the optimizer's state is rebuilt on the way.
//! Training and replay apply a record through the same [`StepRecord::apply`], which makes replay
//! bit-exact by construction.
//!
//! The records hold the values the update used, after clipping and scheduling: replay needs no
//! configuration, engine or data. The losses are kept for reporting only.

use adapters::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::optimizer::{Optimizer, OptimizerState, TrainedTensors};
use crate::spsa::Estimator;
use crate::{Result, TrainError};

/// What one MeZO step did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// 0-based index of the step in its run.
    pub step: u64,
    /// One seed per perturbation (n-SPSA's q = `seeds.len()`).
    pub seeds: Vec<u64>,
    /// Per seed, clipped, as applied: `(L+ − L−)/(2ε)`, or FZOO's `(Lᵢ − L₀)/σ`.
    pub projected_grads: Vec<f32>,
    /// The learning rate of this step, after the schedule.
    pub lr: f32,
    pub weight_decay: f32,
    /// L(θ+εz) on the step's minibatch, mean over the seeds.
    pub loss_plus: f32,
    /// L(θ−εz) on the step's minibatch, mean over the seeds; with FZOO, the baseline L(θ).
    pub loss_minus: f32,
    /// How the projected gradients were estimated (absent in the log: central differences).
    /// For reporting: the update depends only on the gradients as applied.
    #[serde(default, skip_serializing_if = "Estimator::is_central")]
    pub estimator: Estimator,
    /// The run's optimizer (absent in the log: ZO-SGD).
    #[serde(default, skip_serializing_if = "Optimizer::is_sgd")]
    pub optimizer: Optimizer,
    /// The tensors the run trains (absent in the log: all).
    #[serde(default, skip_serializing_if = "TrainedTensors::is_all")]
    pub trained_tensors: TrainedTensors,
}

impl StepRecord {
    /// Number of perturbations averaged in this step (n-SPSA's q).
    pub fn q(&self) -> usize {
        self.seeds.len()
    }

    /// The minibatch loss around θ, `(L+ + L−)/2`: the training loss to report.
    pub fn train_loss(&self) -> f32 {
        (self.loss_plus + self.loss_minus) / 2.0
    }

    /// Fresh optimizer state for a run whose first record this is.
    pub fn initial_state(&self) -> OptimizerState {
        OptimizerState::new(self.optimizer, self.trained_tensors)
    }

    /// Applies this step's update to `theta`, moving the optimizer's `state` on.
    pub fn apply(&self, theta: &mut LoraAdapter, state: &mut OptimizerState) -> Result<()> {
        let invalid = |reason: String| TrainError::InvalidStepRecord {
            step: self.step,
            reason,
        };
        if self.seeds.is_empty() || self.seeds.len() != self.projected_grads.len() {
            return Err(invalid(format!(
                "needs one projected gradient per seed and at least one seed (given {} seeds, {} gradients)",
                self.seeds.len(),
                self.projected_grads.len()
            )));
        }
        let values = [self.lr, self.weight_decay]
            .into_iter()
            .chain(self.projected_grads.iter().copied());
        if let Some(bad) = values.into_iter().find(|v| !v.is_finite()) {
            return Err(invalid(format!(
                "lr, weight_decay and projected_grads must be finite (given {bad})"
            )));
        }
        self.optimizer
            .validate()
            .map_err(|e| invalid(format!("optimizer: {e}")))?;
        if (state.optimizer(), state.trained()) != (self.optimizer, self.trained_tensors) {
            return Err(invalid(format!(
                "uses optimizer {:?} on {:?} tensors, but the run's state is of {:?} on {:?}; \
                 a run keeps one optimizer",
                self.optimizer,
                self.trained_tensors,
                state.optimizer(),
                state.trained()
            )));
        }
        let projected: Vec<(u64, f32)> = self
            .seeds
            .iter()
            .copied()
            .zip(self.projected_grads.iter().copied())
            .collect();
        state.apply(theta, &projected, self.lr, self.weight_decay);
        Ok(())
    }
}

/// The adapter that training produced from `initial` through the steps of `log`, bit for bit.
pub fn replay(initial: &LoraAdapter, log: &[StepRecord]) -> Result<LoraAdapter> {
    let mut theta = initial.clone();
    if let Some(first) = log.first() {
        let mut state = first.initial_state();
        for record in log {
            record.apply(&mut theta, &mut state)?;
        }
    }
    Ok(theta)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;

    fn record() -> StepRecord {
        StepRecord {
            step: 4,
            seeds: vec![u64::MAX, 17],
            projected_grads: vec![-1.234_568e-3, 27.5],
            lr: 1e-3,
            weight_decay: 0.1,
            loss_plus: 0.25,
            loss_minus: 0.5,
            estimator: Estimator::Central,
            optimizer: Optimizer::Sgd,
            trained_tensors: TrainedTensors::All,
        }
    }

    /// A one-layer adapter of the default LoRA config.
    fn tiny_adapter() -> adapters::LoraAdapter {
        adapters::LoraAdapter::new_initialized(
            adapters::LoraConfig::default(),
            adapters::ModelDims {
                n_layer: 1,
                hidden: 8,
                n_head: 2,
                n_kv_head: 2,
                head_dim: 4,
                ffn: 8,
                qk_rows: adapters::QkRowOrder::HuggingFace,
            },
            0,
        )
        .unwrap()
    }

    #[test]
    fn records_are_rejected_when_they_cannot_be_applied() {
        let adapter = tiny_adapter();
        let mut theta = adapter.clone();
        let mismatched = StepRecord {
            projected_grads: vec![1.0],
            ..record()
        };
        assert_eq!(
            mismatched.apply(&mut theta, &mut record().initial_state()).unwrap_err().to_string(),
            "step record 4: needs one projected gradient per seed and at least one seed (given 2 seeds, 1 gradients)"
        );
        let nan = StepRecord {
            lr: f32::NAN,
            ..record()
        };
        assert_eq!(
            nan.apply(&mut theta, &mut record().initial_state())
                .unwrap_err()
                .to_string(),
            "step record 4: lr, weight_decay and projected_grads must be finite (given NaN)"
        );
        assert_eq!(theta, adapter, "a rejected record must not touch θ");
    }

    #[test]
    fn step_log_roundtrips_through_json_bit_exactly() {
        // The server stores logs as JSON: every f32 and u64 must come back with the same bits.
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let log: Vec<StepRecord> = (0..2_000)
            .map(|step| StepRecord {
                step,
                seeds: vec![rng.gen(), rng.gen()],
                projected_grads: vec![random_finite_f32(&mut rng), random_finite_f32(&mut rng)],
                lr: random_finite_f32(&mut rng),
                weight_decay: rng.gen::<f32>() * 1e-3,
                loss_plus: random_finite_f32(&mut rng),
                loss_minus: random_finite_f32(&mut rng),
                estimator: Estimator::Fzoo,
                optimizer: Optimizer::Momentum {
                    beta: rng.gen::<f32>(),
                },
                trained_tensors: TrainedTensors::LoraB,
            })
            .collect();
        let json = serde_json::to_string(&log).unwrap();
        let back: Vec<StepRecord> = serde_json::from_str(&json).unwrap();
        let bits = |log: &[StepRecord]| -> Vec<u32> {
            log.iter()
                .flat_map(|r| {
                    r.projected_grads
                        .iter()
                        .chain([&r.lr, &r.weight_decay, &r.loss_plus, &r.loss_minus])
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        assert_eq!(bits(&back), bits(&log));
        assert_eq!(back, log);
    }

    #[test]
    fn a_step_record_is_a_few_bytes() {
        let json = serde_json::to_string(&record()).unwrap();
        assert_eq!(
            json,
            r#"{"step":4,"seeds":[18446744073709551615,17],"projected_grads":[-0.001234568,27.5],"lr":0.001,"weight_decay":0.1,"loss_plus":0.25,"loss_minus":0.5}"#
        );
    }

    #[test]
    fn a_record_names_its_estimator_optimizer_and_tensors_unless_they_are_the_defaults() {
        let momentum = StepRecord {
            estimator: Estimator::Fzoo,
            optimizer: Optimizer::Momentum { beta: 0.5 },
            trained_tensors: TrainedTensors::LoraB,
            ..record()
        };
        let json = serde_json::to_string(&momentum).unwrap();
        assert!(
            json.ends_with(
                r#""estimator":"fzoo","optimizer":{"type":"momentum","beta":0.5},"trained_tensors":"lora_b"}"#
            ),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<StepRecord>(&json).unwrap(), momentum);
    }

    #[test]
    fn a_log_that_changes_optimizer_midway_does_not_replay() {
        let initial = tiny_adapter();
        let second = StepRecord {
            step: 5,
            optimizer: Optimizer::Momentum { beta: 0.9 },
            ..record()
        };
        let err = replay(&initial, &[record(), second])
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("step record 5: uses optimizer Momentum { beta: 0.9 }"),
            "{err}"
        );
    }

    /// Any finite f32, from the whole range of exponents (where decimal parsing is hardest).
    fn random_finite_f32(rng: &mut impl Rng) -> f32 {
        loop {
            let v = f32::from_bits(rng.gen());
            if v.is_finite() {
                return v;
            }
        }
    }
}
