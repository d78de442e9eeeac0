//! How a step's projected gradients become an update of θ: plain ZO-SGD, momentum, Adam's
//! moments on the estimate, or ConMeZO's cone around the momentum, and the f32 state they keep.
//!
//! The estimate of a step is `d = Σᵢ (gᵢ/q)·zᵢ` over its q perturbations (each z regenerated from
//! its seed and the state, see [`OptimizerState::directions`]). The optimizers turn it into the
//! update `u`, and θ moves by `θ ← θ − lr·(u + wd·θ)`:
//! - ZO-SGD: `u = d`, no state (the MeZO paper's update).
//! - Momentum: `m ← β·m + (1−β)·d`, `u = m`. The exponential average keeps the scale of `d`, so
//!   the learning rates of ZO-SGD carry over; directions that agree across steps add up, the
//!   noise of single estimates partly cancels.
//! - Adam: the same `m`, `v ← β₂·v + (1−β₂)·d²`, `u = m̂/(√v̂ + ε_adam)` with the bias corrections
//!   `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`. Each element then moves by about `lr` whatever the scale
//!   of its estimate, so Adam takes learning rates 10–100× smaller than ZO-SGD's.
//! - ConMeZO (arXiv 2511.02757): `u = d` as ZO-SGD, but the directions are not isotropic: with
//!   the momentum `m ← β·m + (1−β)·d` kept as above, each step's z is drawn in a cone around it,
//!   `z = cos α·√n·m/|m| + sin α·ζ` with ζ ~ N(0, I) from the seed and n the number of trained
//!   values (so |z| ≈ √n as for plain z). Directions where past estimates agreed are searched
//!   more often: E[g·z] = (sin²α·I + cos²α·n·m̂m̂ᵀ)·∇L, the gradient stretched along m̂. Until m
//!   is non-zero (the first step), z = ζ.
//!
//! The perturbed adapters θ ± εz are new copies ([`OptimizerState::perturbed`]); θ itself is
//! never perturbed and restored (the paper's in-place +ε, −2ε, +ε round trip does not give θ back
//! exactly), so serving can keep reading it.
//!
//! The state is a function of the step log (the seeds and projected gradients of every step so
//! far), so [`crate::replay()`] rebuilds it by applying the records in order through the same
//! [`OptimizerState::apply`]: training and replay stay bit-exact, and a run resumed after a crash
//! continues with the very state it had. Every optimizer costs the step's forwards and no
//! more; momentum and ConMeZO keep one f32 per trained value, Adam two (0.5 M values each for the
//! default LoRA on SmolLM2-135M: 2 and 4 MiB).
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
    /// `u = d`, directions in a cone of half-angle `angle` around the momentum of the estimates.
    #[serde(rename = "conmezo")]
    ConMezo {
        /// In [0, 1): the momentum's decay.
        #[serde(default = "default_beta1")]
        beta: f32,
        /// The cone's half-angle in radians, in (0, π/2]; π/2 is ZO-SGD's isotropic z.
        #[serde(default = "default_cone_angle")]
        angle: f32,
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

/// cos α ≈ 0.27: about 7% of z's squared length along the momentum.
fn default_cone_angle() -> f32 {
    1.3
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
            Optimizer::ConMezo { beta, angle } => {
                unit("optimizer.beta", beta)?;
                if angle > 0.0 && angle <= std::f32::consts::FRAC_PI_2 {
                    Ok(())
                } else {
                    Err(TrainError::config(
                        "optimizer.angle",
                        "in (0, π/2] radians",
                        angle,
                    ))
                }
            }
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
            Optimizer::Momentum { .. } | Optimizer::ConMezo { .. } => 1,
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

/// One direction z of a step: its seed's noise ζ and, for ConMeZO, the cone around the momentum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Direction {
    noise: Perturbation,
    /// `(along, across)`: z = along·m + across·ζ. `None`: z = ζ.
    cone: Option<(f32, f32)>,
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

    /// The directions of `seeds` at this point of the run: each seed's noise ζ, or for ConMeZO
    /// (once the momentum is non-zero) the cone's `cos α·√n·m/|m| + sin α·ζ`, its |m| computed
    /// once for all of them. A step's directions are taken before its update, by the estimate
    /// and by [`Self::apply`] alike.
    pub fn directions(&self, seeds: &[u64]) -> Vec<Direction> {
        let cone = self.cone();
        seeds
            .iter()
            .map(|&seed| Direction {
                noise: Perturbation::new(seed),
                cone,
            })
            .collect()
    }

    /// ConMeZO's `(along, across)` for the current momentum; `None` for isotropic directions.
    fn cone(&self) -> Option<(f32, f32)> {
        let Optimizer::ConMezo { angle, .. } = self.optimizer else {
            return None;
        };
        let squared: f64 = self
            .first
            .iter()
            .flatten()
            .map(|&m| f64::from(m).powi(2))
            .sum();
        let values: usize = self.first.iter().map(Vec::len).sum();
        (squared > 0.0).then(|| {
            let angle = f64::from(angle);
            let along = angle.cos() * (values as f64).sqrt() / squared.sqrt();
            (along as f32, angle.sin() as f32)
        })
    }

    /// `θ + scale·z` for `direction` as a new adapter (θ−εz is `scale` = −ε), z zero on the
    /// untrained tensors; `theta` is left untouched.
    pub fn perturbed(&self, theta: &LoraAdapter, direction: Direction, scale: f32) -> LoraAdapter {
        let mut perturbed = theta.clone();
        let tensors = perturbed.params_mut().enumerate();
        for (index, values) in tensors.filter(|(index, _)| self.trained.includes(*index)) {
            let z = self.direction_values(direction, index, values.len());
            for (value, z) in values.iter_mut().zip(z) {
                *value += scale * z;
            }
        }
        perturbed
    }

    /// The `len` values of z for tensor `index`: the same f32 operations for the perturbation
    /// and for the update.
    fn direction_values(&self, direction: Direction, index: usize, len: usize) -> Vec<f32> {
        let noise = direction.noise.noise(index).take(len);
        match direction.cone {
            None => noise.collect(),
            Some((along, across)) => self.first[index]
                .iter()
                .zip(noise)
                .map(|(&m, zeta)| along * m + across * zeta)
                .collect(),
        }
    }

    /// The update `θ ← θ − lr·(u + wd·θ)` of one step, `u` from `d = Σᵢ (gᵢ/q)·zᵢ` (one
    /// `(seed, g)` per direction) and the state.
    ///
    /// This is the only code that changes θ, in training and in replay alike; its f32 operations
    /// and their order define what "bit-exact replay" reproduces. Per element: the directions are
    /// summed in the order given, starting from the first term (not from 0, so a lone `g·z` is
    /// used as is, sign of zero included); then the optimizer's `u`; then `θ − lr·(u + wd·θ)`.
    /// Untrained tensors are left as they are, weight decay included.
    pub fn apply(
        &mut self,
        theta: &mut LoraAdapter,
        projected: &[(u64, f32)],
        lr: f32,
        weight_decay: f32,
    ) {
        if projected.is_empty() {
            return;
        }
        let seeds: Vec<u64> = projected.iter().map(|&(seed, _)| seed).collect();
        let directions = self.directions(&seeds);
        self.steps += 1;
        let q = projected.len() as f32;
        let scaled_grads: Vec<f32> = projected.iter().map(|&(_, g)| g / q).collect();
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
                .map(|&direction| self.direction_values(direction, index, values.len()))
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
                    Optimizer::ConMezo { beta, .. } => {
                        let m = &mut self.first[index][j];
                        *m = beta * *m + (1.0 - beta) * d;
                        d
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
    fn sgd(theta: &mut LoraAdapter, directions: &[(u64, f32)], lr: f32, wd: f32) {
        OptimizerState::new(Optimizer::Sgd, TrainedTensors::All).apply(theta, directions, lr, wd);
    }

    #[test]
    fn update_regenerates_the_perturbation_direction_bit_for_bit() {
        let theta = adapter_with_nonzero_b(3);
        let (lr, g) = (1e-3f32, 0.75f32);
        let mut updated = theta.clone();
        sgd(&mut updated, &[(11, g)], lr, 0.0);

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
    fn perturbed_is_theta_plus_scale_z_on_the_trained_tensors() {
        let theta = adapter_with_nonzero_b(7);
        let before = theta.clone();
        let epsilon = 1e-3;
        for trained in [TrainedTensors::All, TrainedTensors::LoraB] {
            let state = OptimizerState::new(Optimizer::Sgd, trained);
            let direction = state.directions(&[9])[0];
            let plus = state.perturbed(&theta, direction, epsilon);
            let minus = state.perturbed(&theta, direction, -epsilon);
            assert_eq!(theta, before, "θ itself must not move");
            for (index, ((t, p), m)) in theta
                .params()
                .zip(plus.params())
                .zip(minus.params())
                .enumerate()
            {
                if !trained.includes(index) {
                    assert_eq!((t, t), (p, m), "tensor {index} is not trained");
                    continue;
                }
                let z = z(9, index, t.len());
                for j in 0..t.len() {
                    assert_eq!(p[j].to_bits(), (t[j] + epsilon * z[j]).to_bits());
                    assert_eq!(m[j].to_bits(), (t[j] - epsilon * z[j]).to_bits());
                }
            }
        }
    }

    #[test]
    fn conmezo_draws_its_directions_in_a_cone_around_the_momentum() {
        let theta = adapter_with_nonzero_b(3);
        let (beta, angle) = (0.5f32, 1.0f32);
        let mut state =
            OptimizerState::new(Optimizer::ConMezo { beta, angle }, TrainedTensors::All);
        // Before any step the momentum is 0: z is the seed's noise, and the update is ZO-SGD's.
        assert_eq!(
            state.directions(&[1])[0],
            OptimizerState::new(Optimizer::Sgd, TrainedTensors::All).directions(&[1])[0]
        );
        let mut updated = theta.clone();
        let mut sgd = theta.clone();
        state.apply(&mut updated, &[(1, 2.0)], 1e-2, 0.0);
        OptimizerState::new(Optimizer::Sgd, TrainedTensors::All).apply(
            &mut sgd,
            &[(1, 2.0)],
            1e-2,
            0.0,
        );
        assert_eq!(bits(&updated), bits(&sgd));
        // m = (1−β)·2·z₁, so the next direction is cos α·√n·z₁/|z₁| + sin α·ζ₂.
        let lens: Vec<usize> = theta.params().map(<[f32]>::len).collect();
        let z1: Vec<f64> = lens
            .iter()
            .enumerate()
            .flat_map(|(index, &len)| z(1, index, len))
            .map(f64::from)
            .collect();
        let zeta2: Vec<f64> = lens
            .iter()
            .enumerate()
            .flat_map(|(index, &len)| z(2, index, len))
            .map(f64::from)
            .collect();
        let n = z1.len() as f64;
        let norm1 = z1.iter().map(|v| v * v).sum::<f64>().sqrt();
        let plus = state.perturbed(&theta, state.directions(&[2])[0], 1.0);
        let moved: Vec<f64> = plus
            .params()
            .zip(theta.params())
            .flat_map(|(p, t)| p.iter().zip(t).map(|(p, t)| f64::from(p - t)))
            .collect();
        let angle = f64::from(angle);
        for ((moved, z1), zeta2) in moved.iter().zip(&z1).zip(&zeta2) {
            let expected = angle.cos() * n.sqrt() * z1 / norm1 + angle.sin() * zeta2;
            assert!(
                (moved - expected).abs() < 1e-5 * expected.abs().max(1.0),
                "{moved} vs {expected}"
            );
        }
        // The update regenerates that same z: θ − lr·g·z, and m moves on.
        let mut again = updated.clone();
        let mut replayed = state.clone();
        replayed.apply(&mut again, &[(2, -1.0)], 1e-2, 0.0);
        let z2: Vec<f32> = plus
            .params()
            .zip(theta.params())
            .flat_map(|(p, t)| p.iter().zip(t).map(|(p, t)| p - t).collect::<Vec<_>>())
            .collect();
        let expected: Vec<f32> = updated
            .params()
            .flatten()
            .zip(&z2)
            .map(|(v, z)| v - 1e-2 * (-z))
            .collect();
        for (a, e) in again.params().flatten().zip(&expected) {
            assert!((a - e).abs() < 1e-6, "{a} vs {e}");
        }
    }

    #[test]
    fn update_averages_over_perturbations_and_decays_weights() {
        let theta = adapter_with_nonzero_b(3);
        let (lr, wd) = (1e-2f32, 0.1f32);
        let directions = [(1, 0.5f32), (2, -2.0f32)];
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
        state.apply(&mut updated, &[(1, 2.0)], lr, 0.0);
        state.apply(&mut updated, &[(2, -1.0)], lr, 0.0);
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
        state.apply(&mut updated, &[(4, 0.3)], lr, 0.0);
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
        state.apply(&mut updated, &[(5, 1.0)], 1e-2, 0.1);
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
        let flat = Optimizer::ConMezo {
            beta: 0.9,
            angle: 2.0,
        };
        assert_eq!(
            flat.validate().unwrap_err().to_string(),
            "`optimizer.angle` must be in (0, π/2] radians (given 2)"
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
        assert_eq!(
            parse(r#"{"type":"conmezo"}"#).unwrap(),
            Optimizer::ConMezo {
                beta: 0.9,
                angle: 1.3
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
