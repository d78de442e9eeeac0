//! MeZO's random directions: the seeded noise every direction z is made of (θ ± εz and the
//! update are [`crate::optimizer`]'s, which also bends z towards the momentum for ConMeZO).
//!
//! z is never stored. For a step seed `s`, the values of z for the adapter's tensor number `t`
//! (in [`adapters::LoraAdapter::params`] order) are the standard normal draws of a ChaCha20 generator keyed
//! by `s` and switched to stream `t`: a counter-based generator, so the same (seed, tensor) gives
//! the same values bit for bit in any order of visiting the tensors, and the update regenerates
//! exactly the z that the perturbation used. (Across platforms, only the ziggurat's rare tail draws
//! go through `f64::ln`, whose last bit is the platform's.) Changing this generator breaks the
//! replay of every stored step log, which is what `noise_values_are_pinned` guards.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use rand_distr::StandardNormal;

/// The direction z of one MeZO perturbation, identified by its seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Perturbation {
    seed: u64,
}

impl Perturbation {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// The values of z for tensor `tensor_index` of an adapter, element by element, row-major:
    /// an endless stream of independent N(0, 1) draws.
    pub fn noise(self, tensor_index: usize) -> impl Iterator<Item = f32> {
        let mut rng = ChaCha20Rng::seed_from_u64(self.seed);
        rng.set_stream(tensor_index as u64);
        std::iter::repeat_with(move || rng.sample(StandardNormal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noise_is_a_function_of_seed_and_tensor_only() {
        let z = |seed: u64, tensor: usize| -> Vec<u32> {
            Perturbation::new(seed)
                .noise(tensor)
                .take(64)
                .map(f32::to_bits)
                .collect()
        };
        assert_eq!(z(5, 3), z(5, 3));
        // Drawing other tensors first does not shift tensor 3's values (counter-based streams).
        let _ = z(5, 0);
        assert_eq!(z(5, 3), z(5, 3));
        assert_ne!(z(5, 3), z(6, 3), "another seed, another direction");
        assert_ne!(z(5, 3), z(5, 4), "another tensor, another stream");
        assert_ne!(
            z(5, 0),
            z(0, 5),
            "seed and tensor must not be interchangeable"
        );
    }

    #[test]
    fn noise_values_are_pinned() {
        // The first values of z for seed 42, tensors 0 and 1, as produced by this generator
        // (ChaCha20 keyed by `seed_from_u64(42)`, stream = tensor index, rand_distr 0.4's
        // StandardNormal in f64 rounded to f32) when the step log format was fixed. A change
        // here means stored step logs no longer replay: do not update these numbers lightly.
        let tensor0: Vec<f32> = Perturbation::new(42).noise(0).take(3).collect();
        let tensor1: Vec<f32> = Perturbation::new(42).noise(1).take(3).collect();
        assert_eq!(tensor0, [0.044_676_196, -0.245_632_95, -0.746_224_64]);
        assert_eq!(tensor1, [-2.060_87, -0.870_405, 0.542_192_1]);
    }

    #[test]
    fn noise_is_standard_normal() {
        let n = 20_000;
        let values: Vec<f64> = Perturbation::new(1)
            .noise(0)
            .take(n)
            .map(f64::from)
            .collect();
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        // Standard errors: 1/√n ≈ 0.007 for the mean, √(2/n) ≈ 0.01 for the variance.
        assert!(mean.abs() < 0.03, "mean {mean}");
        assert!((var - 1.0).abs() < 0.05, "variance {var}");
    }
}
