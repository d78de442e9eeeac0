//! Rotary position embeddings: the tables of one rotation frequency set and the two ways
//! checkpoints pair a head's dimensions.
//!
//! Which pairing a model uses depends on how its GGUF was written, not on the model family
//! alone: llama.cpp's converter permutes llama's `attn_q`/`attn_k` rows so that pairs are
//! adjacent ([`RopeStyle::Interleaved`], llama.cpp's "normal" rope), while Gemma's rows keep
//! Hugging Face's order, where dimension `i` pairs with `i + head_dim / 2`
//! ([`RopeStyle::HalfSplit`], llama.cpp's "neox" rope).

use super::gguf::Metadata;
use super::{EngineError, Result};

/// How a head's dimensions pair up for rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(x[2i], x[2i+1])`.
    Interleaved,
    /// Pairs `(x[i], x[i + head_dim / 2])`.
    HalfSplit,
}

/// The frequencies of one rotary embedding, as a GGUF describes them.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeFrequencies {
    /// `θ`: pair `i` turns by `position · θ^(-2i / head_dim)`.
    pub theta: f32,
    /// Linear scaling: positions are multiplied by this (`1 / rope.scaling.factor`; 1 when the
    /// file asks for none).
    pub position_scale: f32,
    /// Llama 3.1's per-pair factors (`rope_freqs.weight`), each dividing its pair's angle.
    pub pair_factors: Option<Vec<f32>>,
}

impl RopeFrequencies {
    /// `θ` alone, unscaled.
    pub fn plain(theta: f32) -> Self {
        Self {
            theta,
            position_scale: 1.0,
            pair_factors: None,
        }
    }

    /// `{arch}.rope.freq_base` (or `default_theta`) with the file's linear scaling, if any.
    /// Scalings this engine does not implement (YaRN, LongRoPE) are refused rather than
    /// ignored: positions past the trained context would silently come out wrong.
    pub fn from_metadata(meta: &Metadata<'_>, arch: &str, default_theta: f32) -> Result<Self> {
        let base_key = format!("{arch}.rope.freq_base");
        let theta = match meta.get(&base_key) {
            Some(_) => meta.f32(&base_key)?,
            None => default_theta,
        };
        let scaling_key = format!("{arch}.rope.scaling.type");
        let factor_key = format!("{arch}.rope.scaling.factor");
        let position_scale = match meta.get(&scaling_key) {
            None => 1.0,
            Some(_) => match meta.string(&scaling_key)? {
                "none" => 1.0,
                "linear" => {
                    let factor = meta.f32(&factor_key)?;
                    if !(factor.is_finite() && factor > 0.0) {
                        return Err(EngineError::Metadata {
                            key: factor_key,
                            reason: format!("{factor} is not a positive scaling factor"),
                        });
                    }
                    1.0 / factor
                }
                other => {
                    return Err(EngineError::Metadata {
                        key: scaling_key,
                        reason: format!(
                            "rope scaling `{other}` is not implemented (supported: none, linear, \
                             and Llama 3's per-frequency factors in `rope_freqs.weight`)"
                        ),
                    })
                }
            },
        };
        Ok(Self {
            theta,
            position_scale,
            pair_factors: None,
        })
    }
}

/// Cosine and sine tables `[context_length, head_dim / 2]` for one set of frequencies.
#[derive(Debug)]
pub struct Rope {
    style: RopeStyle,
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    pub fn new(
        style: RopeStyle,
        head_dim: usize,
        frequencies: &RopeFrequencies,
        context_length: usize,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| 1.0 / frequencies.theta.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        let factors = frequencies
            .pair_factors
            .clone()
            .unwrap_or_else(|| vec![1.0; half]);
        let mut cos = Vec::with_capacity(context_length * half);
        let mut sin = Vec::with_capacity(context_length * half);
        for pos in 0..context_length {
            let position = pos as f32 * frequencies.position_scale;
            for (f, factor) in inv_freq.iter().zip(&factors) {
                let angle = position * f / factor;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            style,
            half,
            cos,
            sin,
        }
    }

    /// Rotates `xs`, `[positions.len(), heads, head_dim]`, in place: token `t` by the angles of
    /// `positions[t]`.
    pub fn apply(&self, xs: &mut [f32], heads: usize, positions: &[usize]) {
        let head_dim = 2 * self.half;
        for (token, &pos) in xs.chunks_exact_mut(heads * head_dim).zip(positions) {
            let cos = &self.cos[pos * self.half..(pos + 1) * self.half];
            let sin = &self.sin[pos * self.half..(pos + 1) * self.half];
            for head in token.chunks_exact_mut(head_dim) {
                match self.style {
                    RopeStyle::Interleaved => {
                        for (i, pair) in head.chunks_exact_mut(2).enumerate() {
                            (pair[0], pair[1]) = rotate(pair[0], pair[1], cos[i], sin[i]);
                        }
                    }
                    RopeStyle::HalfSplit => {
                        let (low, high) = head.split_at_mut(self.half);
                        for (i, (x0, x1)) in low.iter_mut().zip(high).enumerate() {
                            (*x0, *x1) = rotate(*x0, *x1, cos[i], sin[i]);
                        }
                    }
                }
            }
        }
    }
}

fn rotate(x0: f32, x1: f32, cos: f32, sin: f32) -> (f32, f32) {
    (x0 * cos - x1 * sin, x0 * sin + x1 * cos)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4-dimensional head whose first pair turns by 90° per position and whose second pair
    /// does not turn (θ huge).
    fn quarter_turns(style: RopeStyle) -> Rope {
        let mut rope = Rope::new(style, 4, &RopeFrequencies::plain(1e30), 3);
        rope.cos = vec![1.0, 1.0, 0.0, 1.0, -1.0, 1.0];
        rope.sin = vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        rope
    }

    #[test]
    fn interleaved_rope_rotates_adjacent_pairs() {
        let mut xs = vec![1.0, 0.0, 0.0, 2.0];
        quarter_turns(RopeStyle::Interleaved).apply(&mut xs, 1, &[1]);
        assert_eq!(xs, vec![0.0, 1.0, 0.0, 2.0]);
    }

    #[test]
    fn half_split_rope_pairs_each_dimension_with_the_one_half_a_head_away() {
        // Pairs are (x0, x2) and (x1, x3); only the first turns.
        let mut xs = vec![1.0, 5.0, 0.0, 7.0];
        quarter_turns(RopeStyle::HalfSplit).apply(&mut xs, 1, &[1]);
        assert_eq!(xs, vec![0.0, 5.0, 1.0, 7.0]);
    }

    #[test]
    fn each_token_turns_by_its_own_position() {
        let mut xs = vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
        quarter_turns(RopeStyle::Interleaved).apply(&mut xs, 1, &[0, 2]);
        assert_eq!(xs, vec![1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn tables_follow_theta_scaling_and_pair_factors() {
        let frequencies = RopeFrequencies {
            theta: 10_000.0,
            position_scale: 0.5,
            pair_factors: Some(vec![1.0, 4.0]),
        };
        let rope = Rope::new(RopeStyle::Interleaved, 4, &frequencies, 8);
        // Position 6 scaled to 3; pair 1's frequency is 10000^(-1/2) = 0.01, divided by 4.
        let angle0 = 3.0f32;
        let angle1 = 3.0f32 * 0.01 / 4.0;
        assert!((rope.cos[12] - angle0.cos()).abs() < 1e-6);
        assert!((rope.sin[13] - angle1.sin()).abs() < 1e-6);
    }
}
