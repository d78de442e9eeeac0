//! The Gemma 3 architecture (text decoder, as llama.cpp's `gemma3` GGUFs hold it): its config
//! and its block.
//!
//! What differs from llama, each following llama.cpp and Hugging Face's `Gemma3TextModel`:
//! - Token embeddings are scaled by √hidden before the first block; the output projection is
//!   tied to them (a 262k-token vocabulary).
//! - Each block normalizes four times: before and after attention, before and after the MLP
//!   (the "post" norms apply to the sublayer's output, before it joins the residual stream).
//! - Queries and keys are RMS-normalized per head (QK-norm) before the rotary embedding.
//! - Five of every six layers attend over a sliding window of the last
//!   `gemma3.attention.sliding_window` positions and rotate with θ = 10 000; every sixth layer
//!   attends globally with the file's `gemma3.rope.freq_base` (and its linear scaling, if any).
//!   GGUF has no key for the pattern: llama.cpp fixes it at 6 for Gemma 3, and so does this.
//! - The MLP is GeGLU with the tanh approximation of GELU.
//! - Heads are `gemma3.attention.key_length` wide (256 on 270M), not `hidden / n_head`.
//! - q/k rows keep Hugging Face's order (no llama permutation), so the rope pairs dimension `i`
//!   with `i + head_dim / 2` and PEFT adapters need no row conversion.
//! - RMS norm weights are stored with Gemma's `1 +` already added by the converter.

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
use super::{EngineError, Result};

/// Every sixth layer (5, 11, 17, …) attends globally; the others over the sliding window.
const GLOBAL_LAYER_EVERY: usize = 6;
/// θ of the sliding-window layers (Hugging Face's `rope_local_base_freq`).
const LOCAL_ROPE_THETA: f32 = 10_000.0;
const KEY_SLIDING_WINDOW: &str = "gemma3.attention.sliding_window";
/// Gemma 3 27B (62 layers) scales scores by `1/√(hidden / n_head)` instead of `1/√head_dim`
/// (its `query_pre_attn_scalar`), as llama.cpp does.
const LAYERS_OF_27B: usize = 62;

/// The shapes under `gemma3.*`.
pub fn config(meta: &Metadata<'_>, vocab_size: usize) -> Result<TransformerConfig> {
    let mut config =
        TransformerConfig::from_metadata(meta, "gemma3", vocab_size, QkRowOrder::HuggingFace)?;
    config.embedding_scale = (config.hidden as f32).sqrt();
    Ok(config)
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    attn: AttentionWeights,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    post_attention_norm: RmsNorm,
    ffn_norm: RmsNorm,
    mlp: GatedMlp,
    post_ffw_norm: RmsNorm,
}

/// Gemma 3's blocks, with the two rotary tables and attention shapes (local and global).
#[derive(Debug)]
pub struct Gemma3Layers {
    blocks: Vec<Block>,
    local_rope: Rope,
    global_rope: Rope,
    local: HeadShape,
    global: HeadShape,
}

impl Gemma3Layers {
    pub fn load(reader: &mut TensorReader<'_>, c: &TransformerConfig) -> Result<Self> {
        let eps = c.rms_norm_eps;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("blk.{i}");
            let mut norm =
                |name: &str, len: usize| reader.rms_norm(&format!("{p}.{name}.weight"), len, eps);
            blocks.push(Block {
                attn_norm: norm("attn_norm", c.hidden)?,
                q_norm: norm("attn_q_norm", c.head_dim)?,
                k_norm: norm("attn_k_norm", c.head_dim)?,
                post_attention_norm: norm("post_attention_norm", c.hidden)?,
                ffn_norm: norm("ffn_norm", c.hidden)?,
                post_ffw_norm: norm("post_ffw_norm", c.hidden)?,
                attn: AttentionWeights::load(reader, i, c)?,
                mlp: GatedMlp::load(reader, i, c, Activation::GeluTanh)?,
            });
        }
        let meta = reader.file.metadata();
        let window = meta.usize(KEY_SLIDING_WINDOW)?;
        if window == 0 {
            return Err(EngineError::Metadata {
                key: KEY_SLIDING_WINDOW.into(),
                reason: "a sliding window of 0 positions sees nothing".into(),
            });
        }
        let global_frequencies = RopeFrequencies::from_metadata(&meta, "gemma3", 1_000_000.0)?;
        let local_frequencies = RopeFrequencies::plain(LOCAL_ROPE_THETA);
        let rope = |frequencies| {
            Rope::new(
                RopeStyle::HalfSplit,
                c.head_dim,
                frequencies,
                c.context_length,
            )
        };
        let score_width = if c.n_layer == LAYERS_OF_27B {
            c.hidden / c.n_head
        } else {
            c.head_dim
        };
        let global = HeadShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
            scale: 1.0 / (score_width as f32).sqrt(),
            window: None,
        };
        Ok(Self {
            blocks,
            local_rope: rope(&local_frequencies),
            global_rope: rope(&global_frequencies),
            local: HeadShape {
                window: Some(window),
                ..global
            },
            global,
        })
    }

    fn is_global(layer: usize) -> bool {
        layer % GLOBAL_LAYER_EVERY == GLOBAL_LAYER_EVERY - 1
    }
}

impl DecoderLayers for Gemma3Layers {
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rows: &mut [BatchRow<'_>],
        batch: &ForwardContext<'_>,
    ) -> Result<Tensor> {
        let block = &self.blocks[layer];
        let (rope, shape) = if Self::is_global(layer) {
            (&self.global_rope, self.global)
        } else {
            (&self.local_rope, self.local)
        };
        let h = block.attn_norm.forward(xs)?;
        // Attention runs on the host, row by row (see `attention.rs`).
        let (q, k, v) = block.attn.qkv(layer, &h, batch)?;
        // Each head is normalized on its own: rows of `head_dim`, the norms' width.
        let mut q = block.q_norm.normalize_rows(&q);
        let mut k = block.k_norm.normalize_rows(&k);
        rope.apply(&mut q, shape.n_head, &batch.positions);
        rope.apply(&mut k, shape.n_kv_head, &batch.positions);
        let heads = attend_rows(layer, (&q, &k, &v), shape, rows, batch)?;
        let h = block.attn.output(layer, &heads, batch)?;
        let xs = (xs + block.post_attention_norm.forward(&h)?)?;
        let h = block.ffn_norm.forward(&xs)?;
        let h = block.mlp.forward(layer, &h, batch)?;
        Ok((&xs + block.post_ffw_norm.forward(&h)?)?)
    }

    fn matrices(&self) -> Vec<&Matrix> {
        self.blocks
            .iter()
            .flat_map(|b| b.attn.matrices().into_iter().chain(b.mlp.matrices()))
            .collect()
    }
}
