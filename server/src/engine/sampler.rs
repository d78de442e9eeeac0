//! Choosing the next token from logits: greedy or sampled (temperature, top-k, top-p), with
//! OpenAI's presence/frequency penalties, reproducible for a given seed, plus the log-probs
//! clients ask for (`logprobs`, `top_logprobs`).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{EngineError, Result};

/// Sampling settings of one sequence, already validated (see [`SamplingParams::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy decoding.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Keep the k most likely tokens; 0 disables it.
    pub top_k: usize,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// Same seed, same prompt, same settings → same tokens. `None` draws a fresh seed.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, limit: &str, value: f32| {
            Err(EngineError::InvalidRequest(format!(
                "`{field}` must be {limit} (given {value})"
            )))
        };
        if !(self.temperature.is_finite() && (0.0..=2.0).contains(&self.temperature)) {
            return bad("temperature", "between 0 and 2", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "in (0, 1]", self.top_p);
        }
        for (field, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(value.is_finite() && (-2.0..=2.0).contains(&value)) {
                return bad(field, "between -2 and 2", value);
            }
        }
        Ok(())
    }
}

/// A token with its log-probability under the model (before penalties and temperature).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The per-sequence sampler: settings, random state, and token counts for the penalties.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    counts: std::collections::HashMap<u32, u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let seed = params.seed.unwrap_or_else(|| rand::thread_rng().gen());
        Self {
            params,
            rng: ChaCha8Rng::seed_from_u64(seed),
            counts: Default::default(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from one row of logits and records it for the penalties.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits);
        let token = if self.params.temperature == 0.0 {
            argmax(&logits)
        } else {
            self.sample_from(&logits)
        };
        *self.counts.entry(token).or_default() += 1;
        token
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        if presence == 0.0 && frequency == 0.0 {
            return;
        }
        for (&token, &count) in &self.counts {
            if let Some(l) = logits.get_mut(token as usize) {
                *l -= presence + frequency * count as f32;
            }
        }
    }

    fn sample_from(&mut self, logits: &[f32]) -> u32 {
        let inv_t = 1.0 / self.params.temperature;
        // Candidates sorted by logit, best first; ties broken by id so runs are reproducible.
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l * inv_t))
            .collect();
        if candidates.is_empty() {
            return argmax(logits);
        }
        let k = if self.params.top_k == 0 {
            candidates.len()
        } else {
            self.params.top_k.min(candidates.len())
        };
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if k < candidates.len() {
            candidates.select_nth_unstable_by(k - 1, by_logit);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(by_logit);
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
        if self.params.top_p < 1.0 {
            let mut mass = 0.0;
            let keep = probs
                .iter()
                .position(|p| {
                    mass += p;
                    mass >= self.params.top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
            let total: f32 = probs.iter().sum();
            probs.iter_mut().for_each(|p| *p /= total);
        }
        let mut u: f32 = self.rng.gen();
        for (i, p) in probs.iter().enumerate() {
            if u < *p {
                return candidates[i].0;
            }
            u -= p;
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit (the lowest index among equals).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, l) in logits.iter().enumerate() {
        if *l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Log-softmax of one row of logits.
pub fn log_softmax_row(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let log_sum = logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln() + max;
    logits.iter().map(|l| l - log_sum).collect()
}

/// The `n` most likely tokens of a log-prob row, best first (ties by lower id).
pub fn top_logprobs(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut all: Vec<TokenLogprob> = logprobs
        .iter()
        .enumerate()
        .map(|(i, &logprob)| TokenLogprob {
            token: i as u32,
            logprob,
        })
        .collect();
    let by_prob = |a: &TokenLogprob, b: &TokenLogprob| {
        b.logprob.total_cmp(&a.logprob).then(a.token.cmp(&b.token))
    };
    let n = n.min(all.len());
    if n == 0 {
        return Vec::new();
    }
    if n < all.len() {
        all.select_nth_unstable_by(n - 1, by_prob);
        all.truncate(n);
    }
    all.sort_unstable_by(by_prob);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![0.1, 2.0, -1.0, 1.5, 0.0, 1.9]
    }

    #[test]
    fn greedy_takes_the_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_differs() {
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams {
                temperature: 1.5,
                seed: Some(seed),
                ..Default::default()
            });
            (0..64).map(|_| s.sample(&logits())).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_small_keeps_the_best() {
        for params in [
            SamplingParams {
                top_k: 1,
                seed: Some(1),
                ..Default::default()
            },
            SamplingParams {
                top_p: 0.01,
                seed: Some(1),
                ..Default::default()
            },
        ] {
            let mut s = Sampler::new(params);
            assert!((0..32).all(|_| s.sample(&logits()) == 1));
        }
    }

    #[test]
    fn top_k_two_only_draws_the_two_best() {
        let mut s = Sampler::new(SamplingParams {
            top_k: 2,
            temperature: 2.0,
            seed: Some(3),
            ..Default::default()
        });
        let drawn: std::collections::BTreeSet<u32> =
            (0..200).map(|_| s.sample(&logits())).collect();
        assert_eq!(drawn, [1, 5].into_iter().collect());
    }

    #[test]
    fn frequency_penalty_moves_greedy_off_a_repeated_token() {
        let mut s = Sampler::new(SamplingParams {
            frequency_penalty: 0.2,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&logits()), 1);
        // 2.0 - 0.2 = 1.8 < 1.9: the runner-up wins now.
        assert_eq!(s.sample(&logits()), 5);
    }

    #[test]
    fn log_softmax_and_top_logprobs() {
        let lp = log_softmax_row(&logits());
        let total: f32 = lp.iter().map(|l| l.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
        let top = top_logprobs(&lp, 3);
        assert_eq!(
            top.iter().map(|t| t.token).collect::<Vec<_>>(),
            vec![1, 5, 3]
        );
    }

    #[test]
    fn out_of_range_settings_are_rejected_with_the_field_name() {
        let err = SamplingParams {
            temperature: -0.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("temperature"), "{err}");
        let err = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("top_p"), "{err}");
    }
}
