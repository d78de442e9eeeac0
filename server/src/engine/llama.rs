//! The llama architecture (SmolLM2, Llama 2/3, Mistral-style GGUFs): its config and its block.
//!
//! Conventions that bite:
//! - GGUF stores `attn_q`/`attn_k` rows permuted for *interleaved* rotary embeddings, so the
//!   rope pairs adjacent dimensions ([`RopeStyle::Interleaved`]), not the half-split layout of
//!   Hugging Face checkpoints. LoRA `B` rows of q/k follow the same permutation in memory;
//!   [`adapters::qk_rows`] holds it, and PEFT folders are converted on load and save so that
//!   files on disk stay in Hugging Face's order.
//! - Grouped-query attention: query head `h` reads key/value head `h / (n_head / n_kv_head)`.
//! - Rotary frequencies follow the file: `rope_freqs.weight` (Llama 3.1 and later) divides each
//!   frequency pair's angle by its factor, and `llama.rope.scaling.type = "linear"` scales
//!   positions by `1 / llama.rope.scaling.factor`, as llama.cpp computes them; other scaling
//!   types are refused rather than ignored.

use adapters::QkRowOrder;
use candle_core::Tensor;

use super::attention::HeadShape;
use super::batch::BatchRow;
use super::blocks::{
    attend_rows, Activation, AttentionWeights, DecoderLayers, ForwardContext, GatedMlp, RmsNorm,
    TensorReader,
};
use super::gguf::Metadata;
use super::rope::{Rope, RopeFrequencies, RopeStyle};
use super::transformer::TransformerConfig;
use super::weights::Matrix;
use super::Result;

/// Llama 3.1's per-frequency rope factors, one per pair of head dimensions.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The shapes under `llama.*`.
pub fn config(meta: &Metadata<'_>, vocab_size: usize) -> Result<TransformerConfig> {
    // The GGUF loader keeps llama.cpp's interleaved q/k rows (see the opening comment).
    TransformerConfig::from_metadata(meta, "llama", vocab_size, QkRowOrder::GgufInterleaved)
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    attn: AttentionWeights,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
}

/// Llama's blocks: pre-norm attention and SwiGLU MLP, each added to the residual stream.
#[derive(Debug)]
pub struct LlamaLayers {
    blocks: Vec<Block>,
    rope: Rope,
    shape: HeadShape,
}

impl LlamaLayers {
    pub fn load(reader: &mut TensorReader<'_>, c: &TransformerConfig) -> Result<Self> {
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: reader.rms_norm(
                    &format!("{p}.attn_norm.weight"),
                    c.hidden,
                    c.rms_norm_eps,
                )?,
                attn: AttentionWeights::load(reader, i, c)?,
                ffn_norm: reader.rms_norm(
                    &format!("{p}.ffn_norm.weight"),
                    c.hidden,
                    c.rms_norm_eps,
                )?,
                mlp: GatedMlp::load(reader, i, c, Activation::Silu)?,
            });
        }
        let mut frequencies =
            RopeFrequencies::from_metadata(&reader.file.metadata(), "llama", 10_000.0)?;
        if reader.has(ROPE_FREQS) {
            let factors: Vec<f32> = reader.vector(ROPE_FREQS, c.head_dim / 2)?.to_vec1()?;
            if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(reader.invalid(format!(
                    "`{ROPE_FREQS}` holds a factor that is not positive"
                )));
            }
            frequencies.pair_factors = Some(factors);
        }
        Ok(Self {
            blocks,
            rope: Rope::new(
                RopeStyle::Interleaved,
                c.head_dim,
                &frequencies,
                c.context_length,
            ),
            shape: HeadShape {
                n_head: c.n_head,
                n_kv_head: c.n_kv_head,
                head_dim: c.head_dim,
                scale: 1.0 / (c.head_dim as f32).sqrt(),
                window: None,
            },
        })
    }
}

impl DecoderLayers for LlamaLayers {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rows: &mut [BatchRow<'_>],
        batch: &ForwardContext<'_>,
    ) -> Result<Tensor> {
        let block = &self.blocks[layer];
        let h = block.attn_norm.forward(xs)?;
        // Attention runs on the host, row by row (see `attention.rs`).
        let (mut q, mut k, v) = block.attn.qkv(layer, &h, batch)?;
        self.rope.apply(&mut q, self.shape.n_head, &batch.positions);
        self.rope
            .apply(&mut k, self.shape.n_kv_head, &batch.positions);
        let heads = attend_rows(layer, (&q, &k, &v), self.shape, rows, batch)?;
        let xs = (xs + block.attn.output(layer, &heads, batch)?)?;
        let h = block.ffn_norm.forward(&xs)?;
        Ok((&xs + block.mlp.forward(layer, &h, batch)?)?)
    }

    fn matrices(&self) -> Vec<&Matrix> {
        self.blocks
            .iter()
            .flat_map(|b| b.attn.matrices().into_iter().chain(b.mlp.matrices()))
            .collect()
    }
}
