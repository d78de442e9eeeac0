//! How a step's projected gradients become an update of θ: plain ZO-SGD, momentum, or Adam's
//! moments on the estimate, and the f32 state the last two keep.
//!
//! The estimate of a step is `d = Σᵢ (gᵢ/q)·zᵢ` over its q perturbations (each z regenerated from
//! its seed, see [`crate::perturbation`]). The optimizers turn it into the update `u`, and θ moves
//! by `θ ← θ − lr·(u + wd·θ)`:
//! - ZO-SGD: `u = d`, no state (the MeZO paper's update).
//! - Momentum: `m ← β·m + (1−β)·d`, `u = m`. The exponential average keeps the scale of `d`, so
//!   the learning rates of ZO-SGD carry over; directions that agree across steps add up, the
//!   noise of single estimates partly cancels.
//! - Adam: the same `m`, `v ← β₂·v + (1−β₂)·d²`, `u = m̂/(√v̂ + ε_adam)` with the bias corrections
//!   `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`. Each element then moves by about `lr` whatever the scale
//!   of its estimate, so Adam takes learning rates 10–100× smaller than ZO-SGD's.
//!
//! The state is a function of the step log (the seeds and projected gradients of every step so
//! far), so [`crate::replay()`] rebuilds it by applying the records in order through the same
//! [`OptimizerState::apply`]: training and replay stay bit-exact, and a run resumed after a crash
//! continues with the very state it had. Every optimizer costs the step's two forwards and no
//! more; momentum keeps one f32 per trained value, Adam two (0.5 M values each for the default
//! LoRA on SmolLM2-135M: 2 and 4 MiB).
//!
//! With [`TrainedTensors::LoraB`] only the B matrices of the adapter are perturbed and updated
//! (LoRA-FA, arXiv 2308.03303): A keeps its random initialisation. At B = 0 the loss does not
//! depend on A to first order, so perturbing A adds dimensions that carry noise and no signal; the
//! variance of a zeroth-order estimate grows with the number of perturbed values.

use adapters::LoraAdapter;
use serde::{Deserialize, Serialize};

use crate::perturbation::Perturbation;
use crate::{Result, TrainError};

/// The optimizer of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Optimizer {
    /// `u = d`: MeZO's ZO-SGD.
    #[default]
    Sgd,
    /// `m ← β·m + (1−β)·d`, `u = m`.
    Momentum {
        /// In [0, 1); 0 is ZO-SGD.
        #[serde(default = "default_beta1")]
        beta: f32,
    },
    /// Adam's moments on the estimate.
    Adam {
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        /// Added to `√v̂`, > 0.
        #[serde(default = "default_adam_epsilon")]
        epsilon: f32,
    },
}

fn default_beta1() -> f32 {
    0.9
}

fn default_beta2() -> f32 {
    0.999
}

fn default_adam_epsilon() -> f32 {
    1e-8
}

impl Optimizer {
    pub fn is_sgd(&self) -> bool {
        matches!(self, Optimizer::Sgd)
    }

    /// Checks the optimizer's own parameters; `field` is where it sits in the caller's config.
    pub fn validate(&self) -> Result<()> {
        let unit = |field: &'static str, value: f32| {
            if (0.0..1.0).contains(&value) {
                Ok(())
            } else {
                Err(TrainError::config(field, "in [0, 1)", value))
            }
        };
        match *self {
            Optimizer::Sgd => Ok(()),
            Optimizer::Momentum { beta } => unit("optimizer.beta", beta),
            Optimizer::Adam {
                beta1,
                beta2,
                epsilon,
            } => {
                unit("optimizer.beta1", beta1)?;
                unit("optimizer.beta2", beta2)?;
                if epsilon.is_finite() && epsilon > 0.0 {
                    Ok(())
                } else {
                    Err(TrainError::config(
                        "optimizer.epsilon",
                        "a finite number > 0",
                        epsilon,
                    ))
                }
            }
        }
    }

    /// f32 values of state per trained value.
    pub fn state_per_value(&self) -> usize {
        match self {
            Optimizer::Sgd => 0,
            Optimizer::Momentum { .. } => 1,
            Optimizer::Adam { .. } => 2,
        }
    }
}

/// Which tensors of the adapter a run perturbs and updates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainedTensors {
    /// A and B of every adapted matrix.
    #[default]
    All,
    /// B only; A stays as initialised (LoRA-FA).
    LoraB,
}

impl TrainedTensors {
    pub fn is_all(&self) -> bool {
        *self == TrainedTensors::All
    }

    /// Whether tensor `index` (in [`LoraAdapter::params`] order: A, then B, of each matrix) is
    /// trained.
    pub fn includes(self, index: usize) -> bool {
        match self {
            TrainedTensors::All => true,
            TrainedTensors::LoraB => index % 2 == 1,
        }
    }
}

/// An optimizer with its state: the moments of each trained tensor and the steps they hold.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    optimizer: Optimizer,
    trained: TrainedTensors,
    /// Per tensor in [`LoraAdapter::params`] order (empty for untrained tensors): m.
    first: Vec<Vec<f32>>,
    /// Per tensor: Adam's v.
    second: Vec<Vec<f32>>,
    steps: u64,
}

impl OptimizerState {
    /// Fresh state (zero moments) for a run of `optimizer` over `trained`.
    pub fn new(optimizer: Optimizer, trained: TrainedTensors) -> Self {
        Self {
            optimizer,
            trained,
            first: Vec::new(),
            second: Vec::new(),
            steps: 0,
        }
    }

    pub fn optimizer(&self) -> Optimizer {
        self.optimizer
    }

    pub fn trained(&self) -> TrainedTensors {
        self.trained
    }

    /// Updates applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The update `θ ← θ − lr·(u + wd·θ)` of one step, `u` from `d = Σᵢ (gᵢ/q)·zᵢ` and the state.
    ///
    /// This is the only code that changes θ, in training and in replay alike; its f32 operations
    /// and their order define what "bit-exact replay" reproduces. Per element: the directions are
    /// summed in the order given, starting from the first term (not from 0, so a lone `g·z` is
    /// used as is, sign of zero included); then the optimizer's `u`; then `θ − lr·(u + wd·θ)`.
    /// Untrained tensors are left as they are, weight decay included.
    pub fn apply(
        &mut self,
        theta: &mut LoraAdapter,
        directions: &[(Perturbation, f32)],
        lr: f32,
        weight_decay: f32,
    ) {
        if directions.is_empty() {
            return;
        }
        self.steps += 1;
        let q = directions.len() as f32;
        let scaled_grads: Vec<f32> = directions.iter().map(|&(_, g)| g / q).collect();
        let moments = self.optimizer.state_per_value();
        if moments >= 1 && self.first.is_empty() {
            self.first = self.zeros_like(theta);
        }
        if moments >= 2 && self.second.is_empty() {
            self.second = self.zeros_like(theta);
        }
        // Adam's bias corrections, once per step in f64 and rounded once.
        let (correction1, correction2) = match self.optimizer {
            Optimizer::Adam { beta1, beta2, .. } => {
                let t = i32::try_from(self.steps).unwrap_or(i32::MAX);
                (
                    (1.0 - f64::from(beta1).powi(t)) as f32,
                    (1.0 - f64::from(beta2).powi(t)) as f32,
                )
            }
            _ => (1.0, 1.0),
        };
        for (index, values) in theta.params_mut().enumerate() {
            if !self.trained.includes(index) {
                continue;
            }
            let zs: Vec<Vec<f32>> = directions
                .iter()
                .map(|(z, _)| z.noise(index).take(values.len()).collect())
                .collect();
            for (j, value) in values.iter_mut().enumerate() {
                let mut d = scaled_grads[0] * zs[0][j];
                for (g, z) in scaled_grads.iter().zip(&zs).skip(1) {
                    d += g * z[j];
                }
                let update = match self.optimizer {
                    Optimizer::Sgd => d,
                    Optimizer::Momentum { beta } => {
                        let m = &mut self.first[index][j];
                        *m = beta * *m + (1.0 - beta) * d;
                        *m
                    }
                    Optimizer::Adam {
                        beta1,
                        beta2,
                        epsilon,
                    } => {
                        let m = &mut self.first[index][j];
                        *m = beta1 * *m + (1.0 - beta1) * d;
                        let v = &mut self.second[index][j];
                        *v = beta2 * *v + (1.0 - beta2) * (d * d);
                        (*m / correction1) / ((*v / correction2).sqrt() + epsilon)
                    }
                };
                *value -= lr * (update + weight_decay * *value);
            }
        }
    }

    /// One zero buffer per trained tensor of `theta`, an empty one per untrained tensor.
    fn zeros_like(&self, theta: &LoraAdapter) -> Vec<Vec<f32>> {
        theta
            .params()
            .enumerate()
            .map(|(index, values)| {
                if self.trained.includes(index) {
                    vec![0.0; values.len()]
                } else {
                    Vec::new()
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use rand_distr::StandardNormal;

    use super::*;
    use crate::test_support::adapter_with_nonzero_b;

    fn z(seed: u64, index: usize, len: usize) -> Vec<f32> {
        Perturbation::new(seed).noise(index).take(len).collect()
    }

    fn bits(adapter: &LoraAdapter) -> Vec<Vec<u32>> {
        adapter
            .params()
            .map(|p| p.iter().map(|v| v.to_bits()).collect())
            .collect()
    }

    /// One ZO-SGD update of all tensors.
    fn sgd(theta: &mut LoraAdapter, directions: &[(Perturbation, f32)], lr: f32, wd: f32) {
        OptimizerState::new(Optimizer::Sgd, TrainedTensors::All).apply(theta, directions, lr, wd);
    }

    #[test]
    fn update_regenerates_the_perturbation_direction_bit_for_bit() {
        let theta = adapter_with_nonzero_b(3);
        let (lr, g) = (1e-3f32, 0.75f32);
        let mut updated = theta.clone();
        sgd(&mut updated, &[(Perturbation::new(11), g)], lr, 0.0);

        // θ − lr·g·z with z drawn afresh from its own generator, independent of the optimizer.
        let mut expected = theta.clone();
        for (index, values) in expected.params_mut().enumerate() {
            let mut rng = ChaCha20Rng::seed_from_u64(11);
            rng.set_stream(index as u64);
            for v in values.iter_mut() {
                let z: f32 = rng.sample(StandardNormal);
                *v -= lr * (g * z);
            }
        }
        assert_eq!(bits(&updated), bits(&expected));
        assert_ne!(bits(&updated), bits(&theta));
    }

    #[test]
    fn update_averages_over_perturbations_and_decays_weights() {
        let theta = adapter_with_nonzero_b(3);
        let (lr, wd) = (1e-2f32, 0.1f32);
        let directions = [
            (Perturbation::new(1), 0.5f32),
            (Perturbation::new(2), -2.0f32),
        ];
        let mut updated = theta.clone();
        sgd(&mut updated, &directions, lr, wd);

        let mut expected = theta.clone();
        for (index, values) in expected.params_mut().enumerate() {
            let z1: Vec<f32> = Perturbation::new(1)
                .noise(index)
                .take(values.len())
                .collect();
            let z2: Vec<f32> = Perturbation::new(2)
                .noise(index)
                .take(values.len())
                .collect();
            for (j, v) in values.iter_mut().enumerate() {
                let direction = (0.5 / 2.0) * z1[j] + (-2.0 / 2.0) * z2[j];
                *v -= lr * (direction + wd * *v);
            }
        }
        assert_eq!(bits(&updated), bits(&expected));
    }

    #[test]
    fn update_without_perturbations_changes_nothing() {
        let theta = adapter_with_nonzero_b(3);
        let mut updated = theta.clone();
        sgd(&mut updated, &[], 1.0, 0.5);
        assert_eq!(bits(&updated), bits(&theta));
    }

    #[test]
    fn momentum_is_an_exponential_average_of_the_estimates() {
        let theta = adapter_with_nonzero_b(3);
        let (lr, beta) = (1e-2f32, 0.5f32);
        let mut updated = theta.clone();
        let mut state = OptimizerState::new(Optimizer::Momentum { beta }, TrainedTensors::All);
        state.apply(&mut updated, &[(Perturbation::new(1), 2.0)], lr, 0.0);
        state.apply(&mut updated, &[(Perturbation::new(2), -1.0)], lr, 0.0);
        assert_eq!(state.steps(), 2);

        let mut expected = theta.clone();
        for (index, values) in expected.params_mut().enumerate() {
            let (z1, z2) = (z(1, index, values.len()), z(2, index, values.len()));
            for (j, v) in values.iter_mut().enumerate() {
                let m1 = beta * 0.0 + (1.0 - beta) * (2.0 * z1[j]);
                *v -= lr * m1;
                let m2 = beta * m1 + (1.0 - beta) * (-z2[j]);
                *v -= lr * m2;
            }
        }
        assert_eq!(updated, expected);
    }

    #[test]
    fn adam_moves_each_value_by_about_lr_on_its_first_step() {
        let theta = adapter_with_nonzero_b(3);
        let lr = 1e-3f32;
        let mut updated = theta.clone();
        let optimizer = Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 1e-8,
        };
        let mut state = OptimizerState::new(optimizer, TrainedTensors::All);
        state.apply(&mut updated, &[(Perturbation::new(4), 0.3)], lr, 0.0);
        // Bias-corrected, m̂ = d and v̂ = d², so u = d/(|d| + ε) = ±1 up to ε/|d|.
        for (index, (before, after)) in theta.params().zip(updated.params()).enumerate() {
            let z = z(4, index, before.len());
            for j in 0..before.len() {
                let moved = before[j] - after[j];
                let expected = lr * (0.3 * z[j]).signum();
                assert!((moved - expected).abs() < 1e-6, "{moved} vs {expected}");
            }
        }
    }

    #[test]
    fn lora_b_only_leaves_a_untouched() {
        let theta = adapter_with_nonzero_b(3);
        let mut updated = theta.clone();
        let mut state = OptimizerState::new(Optimizer::Sgd, TrainedTensors::LoraB);
        state.apply(&mut updated, &[(Perturbation::new(5), 1.0)], 1e-2, 0.1);
        for (index, (before, after)) in theta.params().zip(updated.params()).enumerate() {
            if index % 2 == 0 {
                assert_eq!(before, after, "A (tensor {index}) must not move");
            } else {
                assert_ne!(before, after, "B (tensor {index}) must move");
            }
        }
    }

    #[test]
    fn optimizer_parameters_are_checked() {
        assert!(Optimizer::Momentum { beta: 0.9 }.validate().is_ok());
        assert_eq!(
            Optimizer::Momentum { beta: 1.0 }
                .validate()
                .unwrap_err()
                .to_string(),
            "`optimizer.beta` must be in [0, 1) (given 1)"
        );
        let adam = Optimizer::Adam {
            beta1: 0.9,
            beta2: 0.999,
            epsilon: 0.0,
        };
        assert_eq!(
            adam.validate().unwrap_err().to_string(),
            "`optimizer.epsilon` must be a finite number > 0 (given 0)"
        );
    }

    #[test]
    fn optimizers_read_from_json_with_their_defaults() {
        let parse = |json: &str| serde_json::from_str::<Optimizer>(json);
        assert_eq!(parse(r#"{"type":"sgd"}"#).unwrap(), Optimizer::Sgd);
        assert_eq!(
            parse(r#"{"type":"momentum"}"#).unwrap(),
            Optimizer::Momentum { beta: 0.9 }
        );
        assert_eq!(
            parse(r#"{"type":"adam","beta1":0.8}"#).unwrap(),
            Optimizer::Adam {
                beta1: 0.8,
                beta2: 0.999,
                epsilon: 1e-8
            }
        );
        let unknown = parse(r#"{"type":"lion"}"#).unwrap_err().to_string();
        assert!(
            unknown.contains("expected one of `sgd`, `momentum`, `adam`"),
            "{unknown}"
        );
        assert!(parse(r#"{"type":"momentum","betta":0.5}"#).is_err());
    }
}
