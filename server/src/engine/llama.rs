//! The llama architecture (SmolLM2, Llama 2/3, Mistral-style GGUFs): loading from GGUF and the
//! batched forward pass.
//!
//! Conventions that bite:
//! - GGUF stores `attn_q`/`attn_k` rows permuted for *interleaved* rotary embeddings (pairs
//!   `(x[2i], x[2i+1])`, llama.cpp's "normal" rope), so [`apply_rope`] rotates pairs, not the
//!   half-split layout of Hugging Face checkpoints. LoRA `B` rows of q/k follow the same
//!   permutation in memory; [`adapters::qk_rows`] holds it, and PEFT folders are converted on
//!   load and save so that files on disk stay in Hugging Face's order.
//! - The output projection is tied to `token_embd.weight` when `output.weight` is absent; both
//!   uses share one tensor in memory.
//! - Grouped-query attention: query head `h` reads key/value head `h / (n_head / n_kv_head)`.
//! - Rotary frequencies follow the file: `rope_freqs.weight` (Llama 3.1 and later) divides each
//!   frequency pair's angle by its factor, and `llama.rope.scaling.type = "linear"` scales
//!   positions by `1 / llama.rope.scaling.factor`, as llama.cpp computes them; other scaling
//!   types are refused rather than ignored.

use std::ops::Range;

use adapters::{ModelDims, QkRowOrder, TargetModule};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device, Tensor, D};

use super::attention::{apply_rope, attend, HeadShape, KvSpans};
use super::batch::{BatchRow, RowCache};
use super::gguf::{GgufFile, Metadata};
use super::lora::{add_lora, AdapterSegment};
use super::weights::{Matrix, WeightMode};
use super::{EngineError, Result};

const KEY_ROPE_SCALING: &str = "llama.rope.scaling.type";
const KEY_ROPE_SCALING_FACTOR: &str = "llama.rope.scaling.factor";
/// Llama 3.1's per-frequency rope factors, one per pair of head dimensions.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// Hyperparameters read from `llama.*` metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub context_length: usize,
    pub rope_theta: f32,
    /// Linear rope scaling: positions are multiplied by this (`1 / rope.scaling.factor`; 1 when
    /// the file asks for none).
    pub rope_position_scale: f32,
    pub rms_norm_eps: f64,
}

impl LlamaConfig {
    pub fn from_metadata(meta: &Metadata<'_>, vocab_size: usize) -> Result<Self> {
        let hidden = meta.usize("llama.embedding_length")?;
        let n_head = meta.usize("llama.attention.head_count")?;
        let n_kv_head = match meta.get("llama.attention.head_count_kv") {
            Some(_) => meta.usize("llama.attention.head_count_kv")?,
            None => n_head,
        };
        let invalid = |reason: String| EngineError::Metadata {
            key: "llama.attention.head_count".into(),
            reason,
        };
        if n_head == 0 || n_kv_head == 0 || hidden % n_head != 0 || n_head % n_kv_head != 0 {
            return Err(invalid(format!(
                "{n_head} heads, {n_kv_head} key/value heads and width {hidden} do not divide evenly"
            )));
        }
        let head_dim = hidden / n_head;
        if head_dim % 2 != 0 {
            return Err(invalid(format!("head size {head_dim} is odd")));
        }
        let rope_theta = match meta.get("llama.rope.freq_base") {
            Some(_) => meta.f32("llama.rope.freq_base")?,
            None => 10_000.0,
        };
        let rope_position_scale = match meta.get(KEY_ROPE_SCALING) {
            None => 1.0,
            Some(_) => match meta.string(KEY_ROPE_SCALING)? {
                "none" => 1.0,
                "linear" => {
                    let factor = meta.f32(KEY_ROPE_SCALING_FACTOR)?;
                    if !(factor.is_finite() && factor > 0.0) {
                        return Err(EngineError::Metadata {
                            key: KEY_ROPE_SCALING_FACTOR.into(),
                            reason: format!("{factor} is not a positive scaling factor"),
                        });
                    }
                    1.0 / factor
                }
                other => {
                    return Err(EngineError::Metadata {
                        key: KEY_ROPE_SCALING.into(),
                        reason: format!(
                            "rope scaling `{other}` is not implemented (supported: none, linear, \
                             and Llama 3's per-frequency factors in `rope_freqs.weight`)"
                        ),
                    })
                }
            },
        };
        Ok(Self {
            n_layer: meta.usize("llama.block_count")?,
            hidden,
            ffn: meta.usize("llama.feed_forward_length")?,
            n_head,
            n_kv_head,
            head_dim,
            vocab_size,
            context_length: meta.usize("llama.context_length")?,
            rope_theta,
            rope_position_scale,
            rms_norm_eps: f64::from(meta.f32("llama.attention.layer_norm_rms_epsilon")?),
        })
    }

    /// The shapes a LoRA adapter must fit.
    pub fn dims(&self) -> ModelDims {
        ModelDims {
            n_layer: self.n_layer,
            hidden: self.hidden,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            head_dim: self.head_dim,
            ffn: self.ffn,
            // The GGUF loader keeps llama.cpp's interleaved q/k rows (see the opening comment).
            qk_rows: QkRowOrder::GgufInterleaved,
        }
    }
}

/// Reads tensors out of a GGUF file by name, with errors that name the file and tensor.
struct TensorReader<'a> {
    file: &'a mut GgufFile,
    mode: WeightMode,
}

impl TensorReader<'_> {
    fn qtensor(&mut self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let GgufFile {
            path,
            content,
            reader,
        } = &mut *self.file;
        if !content.tensor_infos.contains_key(name) {
            return Err(EngineError::InvalidGguf {
                path: path.clone(),
                reason: format!("tensor `{name}` is missing"),
            });
        }
        content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| EngineError::InvalidGguf {
                path: path.clone(),
                reason: format!("cannot read tensor `{name}`: {e}"),
            })
    }

    fn matrix(&mut self, name: &str, expected: (usize, usize)) -> Result<Matrix> {
        let matrix = Matrix::from_qtensor(self.qtensor(name)?, self.mode)?;
        let dims = matrix.dims()?;
        if dims != expected {
            return Err(EngineError::InvalidGguf {
                path: self.file.path.clone(),
                reason: format!("tensor `{name}` is {dims:?}, expected {expected:?}"),
            });
        }
        Ok(matrix)
    }

    fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
        let t = self
            .qtensor(name)?
            .dequantize(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        if t.dims() != [len] {
            return Err(EngineError::InvalidGguf {
                path: self.file.path.clone(),
                reason: format!("tensor `{name}` is {:?}, expected [{len}]", t.dims()),
            });
        }
        Ok(t)
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(xs, &self.weight, self.eps)?)
    }
}

/// Rotary embedding tables, `[context_length, head_dim / 2]`.
#[derive(Debug)]
struct RotaryEmbedding {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RotaryEmbedding {
    /// The tables for `config`; `freq_factors` (one per frequency) divide each angle.
    fn new(config: &LlamaConfig, freq_factors: Option<&[f32]>) -> Self {
        let half = config.head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                1.0 / config
                    .rope_theta
                    .powf(2.0 * i as f32 / config.head_dim as f32)
            })
            .collect();
        let factors = freq_factors.map_or_else(|| vec![1.0; half], <[f32]>::to_vec);
        let n = config.context_length;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for pos in 0..n {
            let position = pos as f32 * config.rope_position_scale;
            for (f, factor) in inv_freq.iter().zip(&factors) {
                let angle = position * f / factor;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { half, cos, sin }
    }

    /// `(cos, sin)` rows for the given absolute positions, `[positions, head_dim / 2]` each.
    fn at(&self, positions: &[usize]) -> (Vec<f32>, Vec<f32>) {
        let rows = |table: &[f32]| -> Vec<f32> {
            positions
                .iter()
                .flat_map(|&p| table[p * self.half..(p + 1) * self.half].iter().copied())
                .collect()
        };
        (rows(&self.cos), rows(&self.sin))
    }
}

#[derive(Debug)]
struct Attention {
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
}

#[derive(Debug)]
struct Mlp {
    gate: Matrix,
    up: Matrix,
    down: Matrix,
}

#[derive(Debug)]
struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
}

/// Where a forward pass starts.
#[derive(Debug)]
pub enum Start {
    /// The rows' token embeddings, before layer 0.
    Embeddings,
    /// The packed rows' hidden states `[n_tokens, hidden]` entering `layer`.
    Layer { layer: usize, hidden: Tensor },
}

/// Per-forward facts shared by every layer.
struct ForwardContext<'a> {
    segments: Vec<AdapterSegment<'a>>,
    /// Token range of each row in the packed batch.
    row_ranges: Vec<Range<usize>>,
    /// Rotary tables of every token of the batch, `[n_tokens, head_dim / 2]`.
    cos: Vec<f32>,
    sin: Vec<f32>,
}

/// A llama model loaded once; `forward` serves every kind of work.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    pub mode: WeightMode,
    tok_embeddings: Matrix,
    blocks: Vec<Block>,
    norm: RmsNorm,
    output: Matrix,
    /// `output` is `tok_embeddings` (same storage), as in SmolLM2.
    tied_output: bool,
    rotary: RotaryEmbedding,
}

impl Llama {
    /// Loads every tensor of a llama GGUF in the given weight mode. `vocab_size` comes from the
    /// tokenizer (the embedding must have as many rows).
    pub fn load(file: &mut GgufFile, mode: WeightMode) -> Result<Self> {
        check_architecture(file)?;
        check_complete(file)?;
        let vocab_size = tensor_rows(&file.content, "token_embd.weight").ok_or_else(|| {
            EngineError::InvalidGguf {
                path: file.path.clone(),
                reason: "tensor `token_embd.weight` is missing".into(),
            }
        })?;
        let config = LlamaConfig::from_metadata(&file.metadata(), vocab_size)?;
        let has_output = file.content.tensor_infos.contains_key("output.weight");
        let mut reader = TensorReader { file, mode };
        let c = &config;
        let eps = c.rms_norm_eps as f32;
        let tok_embeddings = reader.matrix("token_embd.weight", (c.vocab_size, c.hidden))?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let q_out = c.n_head * c.head_dim;
            let kv_out = c.n_kv_head * c.head_dim;
            let p = format!("blk.{i}");
            blocks.push(Block {
                attn_norm: RmsNorm {
                    weight: reader.vector(&format!("{p}.attn_norm.weight"), c.hidden)?,
                    eps,
                },
                attn: Attention {
                    wq: reader.matrix(&format!("{p}.attn_q.weight"), (q_out, c.hidden))?,
                    wk: reader.matrix(&format!("{p}.attn_k.weight"), (kv_out, c.hidden))?,
                    wv: reader.matrix(&format!("{p}.attn_v.weight"), (kv_out, c.hidden))?,
                    wo: reader.matrix(&format!("{p}.attn_output.weight"), (c.hidden, q_out))?,
                },
                ffn_norm: RmsNorm {
                    weight: reader.vector(&format!("{p}.ffn_norm.weight"), c.hidden)?,
                    eps,
                },
                mlp: Mlp {
                    gate: reader.matrix(&format!("{p}.ffn_gate.weight"), (c.ffn, c.hidden))?,
                    up: reader.matrix(&format!("{p}.ffn_up.weight"), (c.ffn, c.hidden))?,
                    down: reader.matrix(&format!("{p}.ffn_down.weight"), (c.hidden, c.ffn))?,
                },
            });
        }
        let norm = RmsNorm {
            weight: reader.vector("output_norm.weight", c.hidden)?,
            eps,
        };
        let output = if has_output {
            reader.matrix("output.weight", (c.vocab_size, c.hidden))?
        } else {
            tok_embeddings.clone()
        };
        let freq_factors = if reader.file.content.tensor_infos.contains_key(ROPE_FREQS) {
            let factors: Vec<f32> = reader.vector(ROPE_FREQS, c.head_dim / 2)?.to_vec1()?;
            if factors.iter().any(|f| !(f.is_finite() && *f > 0.0)) {
                return Err(EngineError::InvalidGguf {
                    path: reader.file.path.clone(),
                    reason: format!("`{ROPE_FREQS}` holds a factor that is not positive"),
                });
            }
            Some(factors)
        } else {
            None
        };
        let rotary = RotaryEmbedding::new(&config, freq_factors.as_deref());
        Ok(Self {
            config,
            mode,
            tok_embeddings,
            blocks,
            norm,
            output,
            tied_output: !has_output,
            rotary,
        })
    }

    /// Every weight matrix: the embeddings, each layer's seven, and the output unless it is
    /// the embeddings.
    fn matrices(&self) -> impl Iterator<Item = &Matrix> {
        let layers = self.blocks.iter().flat_map(|b| {
            [
                &b.attn.wq,
                &b.attn.wk,
                &b.attn.wv,
                &b.attn.wo,
                &b.mlp.gate,
                &b.mlp.up,
                &b.mlp.down,
            ]
        });
        let output = (!self.tied_output).then_some(&self.output);
        std::iter::once(&self.tok_embeddings)
            .chain(layers)
            .chain(output)
    }

    /// Bytes held by the weights (a tied output matrix counted once).
    pub fn weights_size_bytes(&self) -> usize {
        self.matrices().map(Matrix::size_bytes).sum()
    }

    /// How many weight matrices are kept in each type (`F32` for the f32 mode and for types no
    /// kernel reads in place), for the start-up log and the tests.
    pub fn matrix_types(&self) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for matrix in self.matrices() {
            *counts.entry(format!("{:?}", matrix.dtype())).or_insert(0) += 1;
        }
        counts
    }

    /// Runs a packed batch and returns, per row, the logits `[k, vocab]` at its requested
    /// positions (`None` when it asked for none). Rows with `RowCache::Append` have their keys
    /// and values appended to their cache.
    pub fn forward(&self, rows: &mut [BatchRow<'_>]) -> Result<Vec<Option<Tensor>>> {
        self.forward_from(rows, Start::Embeddings)
    }

    /// [`Self::forward`] starting where `start` says. Starting at a layer with the hidden states
    /// [`Self::hidden_states_entering`] computed gives exactly (bit for bit) the full forward,
    /// provided no row's adapter changes a layer below it; caches then receive keys and values
    /// of the layers run only.
    pub fn forward_from(
        &self,
        rows: &mut [BatchRow<'_>],
        start: Start,
    ) -> Result<Vec<Option<Tensor>>> {
        let ctx = self.prepare(rows)?;
        let n_tokens = ctx.row_ranges.last().map_or(0, |r| r.end);
        let (first_layer, xs) = match start {
            Start::Embeddings => (0, self.embed(rows, n_tokens)?),
            Start::Layer { layer, hidden } => {
                let expected = (n_tokens, self.config.hidden);
                if layer > self.config.n_layer || hidden.dims2()? != expected {
                    return Err(EngineError::InvalidRequest(format!(
                        "hidden states {:?} entering layer {layer} do not fit a batch of \
                         {n_tokens} tokens in a {}-layer model",
                        hidden.dims(),
                        self.config.n_layer
                    )));
                }
                (layer, hidden)
            }
        };
        let xs = self.run_layers(xs, first_layer..self.config.n_layer, rows, &ctx)?;
        for row in rows.iter_mut() {
            if let RowCache::Append(cache) = &mut row.cache {
                cache.advance(row.tokens.len());
            }
        }
        let xs = self.norm.forward(&xs)?;
        self.logits_at(&xs, rows, &ctx)
    }

    /// The hidden states `[n_tokens, hidden]` entering `layer` for a packed batch of rows with
    /// no cache, computed by the base model (the rows' adapters are not applied): what every
    /// adapter that leaves the layers below `layer` alone sees there.
    pub fn hidden_states_entering(&self, rows: &[BatchRow<'_>], layer: usize) -> Result<Tensor> {
        if layer > self.config.n_layer {
            return Err(EngineError::InvalidRequest(format!(
                "layer {layer} does not exist in a {}-layer model",
                self.config.n_layer
            )));
        }
        let mut base_rows: Vec<BatchRow<'_>> = Vec::with_capacity(rows.len());
        for row in rows {
            if !matches!(row.cache, RowCache::None) {
                return Err(EngineError::InvalidRequest(
                    "hidden states are computed for rows without a cache".into(),
                ));
            }
            base_rows.push(BatchRow {
                tokens: row.tokens,
                cache: RowCache::None,
                adapter: None,
                logits: 0..0,
            });
        }
        let ctx = self.prepare(&base_rows)?;
        let n_tokens = ctx.row_ranges.last().map_or(0, |r| r.end);
        let xs = self.embed(&base_rows, n_tokens)?;
        self.run_layers(xs, 0..layer, &mut base_rows, &ctx)
    }

    fn embed(&self, rows: &[BatchRow<'_>], n_tokens: usize) -> Result<Tensor> {
        let tokens: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        let tokens = Tensor::from_vec(tokens, n_tokens, &Device::Cpu)?;
        self.tok_embeddings.rows(&tokens)
    }

    /// The transformer blocks `layers` over the packed batch's hidden states.
    fn run_layers(
        &self,
        mut xs: Tensor,
        layers: Range<usize>,
        rows: &mut [BatchRow<'_>],
        ctx: &ForwardContext<'_>,
    ) -> Result<Tensor> {
        for layer in layers {
            let block = &self.blocks[layer];
            let residual = &xs;
            let h = block.attn_norm.forward(&xs)?;
            let h = self.attention(layer, &block.attn, &h, rows, ctx)?;
            let xs_attn = (residual + h)?;
            let residual = &xs_attn;
            let h = block.ffn_norm.forward(&xs_attn)?;
            let h = self.mlp(layer, &block.mlp, &h, ctx)?;
            xs = (residual + h)?;
        }
        Ok(xs)
    }

    fn prepare<'a>(&self, rows: &[BatchRow<'a>]) -> Result<ForwardContext<'a>> {
        let mut row_ranges = Vec::with_capacity(rows.len());
        let mut positions = Vec::new();
        let mut segments: Vec<AdapterSegment<'a>> = Vec::new();
        let mut start = 0;
        for row in rows {
            let t = row.tokens.len();
            if t == 0 {
                return Err(EngineError::InvalidRequest(
                    "a batch row has no tokens".into(),
                ));
            }
            let prefix = row.cache.prefix_len();
            if prefix + t > self.config.context_length {
                return Err(EngineError::InputTooLong {
                    tokens: prefix + t,
                    limit: self.config.context_length,
                });
            }
            if let Some(&id) = row
                .tokens
                .iter()
                .find(|&&id| id as usize >= self.config.vocab_size)
            {
                return Err(EngineError::InvalidRequest(format!(
                    "token id {id} is outside the vocabulary of {} tokens",
                    self.config.vocab_size
                )));
            }
            if row.logits.end > t {
                return Err(EngineError::InvalidRequest(format!(
                    "logits requested up to position {} of a {t}-token row",
                    row.logits.end
                )));
            }
            positions.extend(prefix..prefix + t);
            match segments.last_mut() {
                Some(seg) if same_view(seg.view, row.adapter) => seg.len += t,
                _ => segments.push(AdapterSegment {
                    start,
                    len: t,
                    view: row.adapter,
                }),
            }
            row_ranges.push(start..start + t);
            start += t;
        }
        let (cos, sin) = self.rotary.at(&positions);
        Ok(ForwardContext {
            segments,
            row_ranges,
            cos,
            sin,
        })
    }

    fn attention(
        &self,
        layer: usize,
        attn: &Attention,
        xs: &Tensor,
        rows: &mut [BatchRow<'_>],
        ctx: &ForwardContext<'_>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let n = xs.dim(0)?;
        let seg = &ctx.segments;
        let host = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1()?) };
        // [n, heads, head_dim] on the host: attention runs row by row in plain loops
        // (see `attention.rs`), which also writes the caches in place.
        let mut q = host(add_lora(
            xs,
            attn.wq.forward(xs)?,
            layer,
            TargetModule::Q,
            seg,
        )?)?;
        let mut k = host(add_lora(
            xs,
            attn.wk.forward(xs)?,
            layer,
            TargetModule::K,
            seg,
        )?)?;
        let v = host(add_lora(
            xs,
            attn.wv.forward(xs)?,
            layer,
            TargetModule::V,
            seg,
        )?)?;
        apply_rope(&mut q, c.n_head, c.head_dim, &ctx.cos, &ctx.sin);
        apply_rope(&mut k, c.n_kv_head, c.head_dim, &ctx.cos, &ctx.sin);
        let shape = HeadShape {
            n_head: c.n_head,
            n_kv_head: c.n_kv_head,
            head_dim: c.head_dim,
        };
        let q_width = c.n_head * c.head_dim;
        let kv_width = c.n_kv_head * c.head_dim;
        let mut out = vec![0f32; n * q_width];
        for (row, range) in rows.iter_mut().zip(&ctx.row_ranges) {
            let q_row = &q[range.start * q_width..range.end * q_width];
            let own_k = &k[range.start * kv_width..range.end * kv_width];
            let own_v = &v[range.start * kv_width..range.end * kv_width];
            let out_row = &mut out[range.start * q_width..range.end * q_width];
            match &mut row.cache {
                RowCache::None => attend(q_row, KvSpans::one(own_k, own_v), shape, out_row),
                RowCache::Append(cache) => {
                    cache.append(layer, own_k, own_v);
                    let (keys, values) = cache.layer(layer);
                    attend(q_row, KvSpans::one(keys, values), shape, out_row);
                }
                RowCache::Prefix(cache) => {
                    let prefix = cache.layer(layer);
                    attend(q_row, KvSpans::two(prefix, (own_k, own_v)), shape, out_row);
                }
            }
        }
        let ys = Tensor::from_vec(out, (n, q_width), &Device::Cpu)?;
        add_lora(&ys, attn.wo.forward(&ys)?, layer, TargetModule::O, seg)
    }

    fn mlp(
        &self,
        layer: usize,
        mlp: &Mlp,
        xs: &Tensor,
        ctx: &ForwardContext<'_>,
    ) -> Result<Tensor> {
        let seg = &ctx.segments;
        let gate = add_lora(xs, mlp.gate.forward(xs)?, layer, TargetModule::Gate, seg)?;
        let up = add_lora(xs, mlp.up.forward(xs)?, layer, TargetModule::Up, seg)?;
        let h = (candle_nn::ops::silu(&gate)? * up)?;
        add_lora(&h, mlp.down.forward(&h)?, layer, TargetModule::Down, seg)
    }

    fn logits_at(
        &self,
        xs: &Tensor,
        rows: &[BatchRow<'_>],
        ctx: &ForwardContext<'_>,
    ) -> Result<Vec<Option<Tensor>>> {
        let mut picks = Vec::new();
        for (row, range) in rows.iter().zip(&ctx.row_ranges) {
            picks.extend(row.logits.clone().map(|p| (range.start + p) as u32));
        }
        if picks.is_empty() {
            return Ok(rows.iter().map(|_| None).collect());
        }
        let n_picks = picks.len();
        let picked = xs.index_select(&Tensor::from_vec(picks, n_picks, &Device::Cpu)?, 0)?;
        let logits = self.output.forward(&picked)?;
        let mut out = Vec::with_capacity(rows.len());
        let mut offset = 0;
        for row in rows {
            let k = row.logits.len();
            out.push(if k == 0 {
                None
            } else {
                Some(logits.narrow(0, offset, k)?)
            });
            offset += k;
        }
        Ok(out)
    }
}

fn same_view(a: Option<&super::lora::AdapterView>, b: Option<&super::lora::AdapterView>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}

/// `[t, prefix + t]` additive mask: query `i` sees keys `0..=prefix + i`. `None` when `t == 1`
/// (a single new token sees everything before it).
fn tensor_rows(content: &Content, name: &str) -> Option<usize> {
    // GGUF lists dimensions innermost first; candle reverses them, so dims()[0] is rows.
    content
        .tensor_infos
        .get(name)
        .map(|info| info.shape.dims()[0])
}

fn check_architecture(file: &GgufFile) -> Result<()> {
    let architecture = file.metadata().string("general.architecture")?.to_string();
    if architecture != "llama" {
        return Err(EngineError::UnsupportedArchitecture {
            path: file.path.clone(),
            architecture,
        });
    }
    Ok(())
}

/// Rejects a truncated file up front, with a message that says so, instead of failing on
/// whichever tensor happens to be read first past the end.
fn check_complete(file: &GgufFile) -> Result<()> {
    let len = file
        .reader
        .get_ref()
        .metadata()
        .map_err(|source| EngineError::Io {
            path: file.path.clone(),
            source,
        })?
        .len();
    let content = &file.content;
    let needed = content
        .tensor_infos
        .values()
        .map(|info| {
            let elems = info.shape.elem_count();
            let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
            content.tensor_data_offset + info.offset + bytes as u64
        })
        .max()
        .unwrap_or(content.tensor_data_offset);
    if len < needed {
        return Err(EngineError::InvalidGguf {
            path: file.path.clone(),
            reason: format!(
                "the file is truncated: it has {len} bytes, its tensors need {needed}; download it again (`mezo fetch-model`)"
            ),
        });
    }
    Ok(())
}

/// Log-softmax over the vocabulary (last dimension).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::log_softmax(logits, D::Minus1)?)
}
