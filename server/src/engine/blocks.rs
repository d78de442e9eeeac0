//! Building blocks the architectures share: reading named tensors, RMS norm, the attention
//! projections with their LoRA terms, row-by-row attention over each row's cache, and the gated
//! MLP. An architecture file ([`super::llama`], [`super::gemma3`]) composes them into its block
//! and implements [`DecoderLayers`]; [`super::transformer`] runs the rest of the forward.

use std::ops::Range;
use std::sync::{Mutex, PoisonError};

use adapters::TargetModule;
use candle_core::{DType, Device, Tensor};

use super::attention::{attend_all, HeadShape, KvSpans, RowAttention};
use super::batch::{BatchRow, RowCache};
use super::gguf::GgufFile;
use super::lora::{add_lora, AdapterSegment};
use super::transformer::{tensor_bytes, TransformerConfig};
use super::weights::{with_f32_values, Matrix, WeightMode};
use super::{EngineError, Result};
use crate::progress::Progress;

/// The transformer blocks of one architecture: what differs between model families.
pub trait DecoderLayers: std::fmt::Debug + Send + Sync {
    /// Block `layer` over the packed hidden states `xs` `[n_tokens, hidden]`: the hidden states
    /// entering the next block. Rows with a cache read it, and `RowCache::Append` rows write
    /// this layer's keys and values to it.
    fn forward(
        &self,
        layer: usize,
        xs: &Tensor,
        rows: &mut [BatchRow<'_>],
        batch: &ForwardContext<'_>,
    ) -> Result<Tensor>;

    /// Every weight matrix of the blocks (for sizes and the start-up log).
    fn matrices(&self) -> Vec<&Matrix>;
}

/// Per-forward facts shared by every layer.
pub struct ForwardContext<'a> {
    /// Runs of consecutive tokens that share one adapter view.
    pub segments: Vec<AdapterSegment<'a>>,
    /// Token range of each row in the packed batch.
    pub row_ranges: Vec<Range<usize>>,
    /// Absolute position of every token of the batch (after its row's cached prefix).
    pub positions: Vec<usize>,
}

/// Reads tensors out of a GGUF file by name, with errors that name the file and tensor.
pub struct TensorReader<'a> {
    pub file: &'a mut GgufFile,
    pub mode: WeightMode,
    /// Bytes of the file's tensors read so far, shown on a terminal.
    pub progress: Progress,
}

impl TensorReader<'_> {
    pub fn has(&self, name: &str) -> bool {
        self.file.content.tensor_infos.contains_key(name)
    }

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
        let tensor =
            content
                .tensor(reader, name, &Device::Cpu)
                .map_err(|e| EngineError::InvalidGguf {
                    path: path.clone(),
                    reason: format!("cannot read tensor `{name}`: {e}"),
                })?;
        if let Some(info) = content.tensor_infos.get(name) {
            self.progress.advance(tensor_bytes(info));
        }
        Ok(tensor)
    }

    /// A weight matrix `[rows, columns]`, kept as the weight mode says.
    pub fn matrix(&mut self, name: &str, expected: (usize, usize)) -> Result<Matrix> {
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

    /// A vector of `len` values, in f32.
    pub fn vector(&mut self, name: &str, len: usize) -> Result<Tensor> {
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

    pub fn rms_norm(&mut self, name: &str, len: usize, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm {
            weight: to_host(&self.vector(name, len)?)?,
            eps: eps as f32,
        })
    }

    /// An error about `what` in this file.
    pub fn invalid(&self, reason: String) -> EngineError {
        EngineError::InvalidGguf {
            path: self.file.path.clone(),
            reason,
        }
    }
}

/// `x / rms(x) · weight` over the last dimension. (Gemma's `1 + weight` is folded into the
/// stored weight by llama.cpp's converter, so one norm serves both families.)
#[derive(Debug)]
pub struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

/// Rows a core normalizes per hand-off: below this many in all, the norm runs on the calling
/// thread (decode's few rows take less time than waking the pool).
const NORM_ROWS_PER_TASK: usize = 64;

impl RmsNorm {
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = with_f32_values(xs, |xs| self.normalize_rows(xs))?;
        Ok(Tensor::from_vec(ys, xs.shape(), &Device::Cpu)?)
    }

    /// The norm of each row of `xs` (row-major, rows as long as the weight), the rows shared
    /// out between the cores on the products' pool. Bit for bit candle's `rms_norm` (the
    /// reference twin in the tests), which splits a batch's rows on rayon instead, whose
    /// threads then compete with the pool's spinning workers.
    pub fn normalize_rows(&self, xs: &[f32]) -> Vec<f32> {
        let width = self.weight.len();
        let mut ys = vec![0f32; xs.len()];
        if width == 0 {
            return ys;
        }
        let norm_rows = |xs: &[f32], ys: &mut [f32]| {
            for (x, y) in xs.chunks_exact(width).zip(ys.chunks_exact_mut(width)) {
                let sum_of_squares = x.iter().map(|&v| v * v).sum::<f32>();
                let rms = (sum_of_squares / width as f32 + self.eps).sqrt();
                for ((y, &x), &w) in y.iter_mut().zip(x).zip(&self.weight) {
                    *y = x / rms * w;
                }
            }
        };
        let chunk = NORM_ROWS_PER_TASK * width;
        if xs.len() <= chunk {
            norm_rows(xs, &mut ys);
            return ys;
        }
        // Each chunk of rows sits behind a lock that exactly one thread takes, once.
        let tasks: Vec<(&[f32], Mutex<&mut [f32]>)> = xs
            .chunks(chunk)
            .zip(ys.chunks_mut(chunk).map(Mutex::new))
            .collect();
        candle_core::utils::barrier_pool().execute_chunked(tasks.len(), |range| {
            for (xs, ys) in &tasks[range] {
                norm_rows(xs, &mut ys.lock().unwrap_or_else(PoisonError::into_inner));
            }
        });
        ys
    }
}

/// The four attention projections of one block.
#[derive(Debug)]
pub struct AttentionWeights {
    pub wq: Matrix,
    pub wk: Matrix,
    pub wv: Matrix,
    pub wo: Matrix,
}

impl AttentionWeights {
    /// `blk.{layer}.attn_{q,k,v,output}.weight`.
    pub fn load(
        reader: &mut TensorReader<'_>,
        layer: usize,
        c: &TransformerConfig,
    ) -> Result<Self> {
        let q_width = c.n_head * c.head_dim;
        let kv_width = c.n_kv_head * c.head_dim;
        let p = format!("blk.{layer}");
        Ok(Self {
            wq: reader.matrix(&format!("{p}.attn_q.weight"), (q_width, c.hidden))?,
            wk: reader.matrix(&format!("{p}.attn_k.weight"), (kv_width, c.hidden))?,
            wv: reader.matrix(&format!("{p}.attn_v.weight"), (kv_width, c.hidden))?,
            wo: reader.matrix(&format!("{p}.attn_output.weight"), (c.hidden, q_width))?,
        })
    }

    pub fn matrices(&self) -> [&Matrix; 4] {
        [&self.wq, &self.wk, &self.wv, &self.wo]
    }

    /// Queries `[n, n_head · head_dim]`, keys and values `[n, n_kv_head · head_dim]`, each
    /// with the rows' LoRA terms, as row-major values on the host (where attention runs).
    pub fn qkv(
        &self,
        layer: usize,
        xs: &Tensor,
        batch: &ForwardContext<'_>,
    ) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let [q, k, v] = project_many(
            [
                (&self.wq, TargetModule::Q),
                (&self.wk, TargetModule::K),
                (&self.wv, TargetModule::V),
            ],
            xs,
            layer,
            batch,
        )?;
        Ok((q, k, v))
    }

    /// The output projection of the heads' outputs `[n, n_head · head_dim]`.
    pub fn output(&self, layer: usize, ys: &Tensor, batch: &ForwardContext<'_>) -> Result<Tensor> {
        project(&self.wo, ys, layer, TargetModule::O, batch)
    }
}

/// `xs·Wᵀ` of each matrix with the LoRA terms of its module in `layer` for the rows that have
/// them, row-major `[n, out]`: the products run together ([`Matrix::forward_many`]) and each
/// product's vector gets its terms in place, never copied.
fn project_many<const N: usize>(
    projections: [(&Matrix, TargetModule); N],
    xs: &Tensor,
    layer: usize,
    batch: &ForwardContext<'_>,
) -> Result<[Vec<f32>; N]> {
    let mut ys = Matrix::forward_many(projections.map(|(w, _)| w), xs)?;
    for (ys, (_, module)) in ys.iter_mut().zip(projections) {
        add_lora(xs, ys, layer, module, &batch.segments)?;
    }
    Ok(ys)
}

/// [`project_many`] of one matrix, as a tensor `[n, out]`.
fn project(
    w: &Matrix,
    xs: &Tensor,
    layer: usize,
    module: TargetModule,
    batch: &ForwardContext<'_>,
) -> Result<Tensor> {
    let [ys] = project_many([(w, module)], xs, layer, batch)?;
    product_tensor(ys, xs.dim(0)?, w)
}

/// The row-major values of `w`'s product with `rows` rows, as a tensor `[rows, out]`.
fn product_tensor(values: Vec<f32>, rows: usize, w: &Matrix) -> Result<Tensor> {
    let (out, _) = w.dims()?;
    Ok(Tensor::from_vec(values, (rows, out), &Device::Cpu)?)
}

/// A tensor's values on the host, flattened.
pub fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1()?)
}

/// Attention of every row of the batch over its own history: `q` is `[n, n_head, head_dim]`,
/// `k`/`v` `[n, n_kv_head, head_dim]`, all rotated already. Caches are read, and
/// `RowCache::Append` rows get this layer's keys and values appended. Returns the heads'
/// outputs `[n, n_head · head_dim]`.
pub fn attend_rows(
    layer: usize,
    (q, k, v): (&[f32], &[f32], &[f32]),
    shape: HeadShape,
    rows: &mut [BatchRow<'_>],
    batch: &ForwardContext<'_>,
) -> Result<Tensor> {
    let q_width = shape.n_head * shape.head_dim;
    let kv_width = shape.n_kv_head * shape.head_dim;
    let n = q.len() / q_width;
    let own = |range: &Range<usize>| {
        let kv = range.start * kv_width..range.end * kv_width;
        (&k[kv.clone()], &v[kv])
    };
    // Appends first (they need the caches mutably), then every row's queries at once.
    for (row, range) in rows.iter_mut().zip(&batch.row_ranges) {
        if let RowCache::Append(cache) = &mut row.cache {
            let (own_k, own_v) = own(range);
            cache.append(layer, own_k, own_v);
        }
    }
    let attentions: Vec<RowAttention<'_>> = rows
        .iter()
        .zip(&batch.row_ranges)
        .map(|(row, range)| {
            let kv = match &row.cache {
                RowCache::None => {
                    let (own_k, own_v) = own(range);
                    KvSpans::one(own_k, own_v)
                }
                RowCache::Append(cache) => {
                    let (keys, values) = cache.layer(layer);
                    KvSpans::one(keys, values)
                }
                RowCache::Prefix(cache) => KvSpans::two(cache.layer(layer), own(range)),
            };
            RowAttention::new(&q[range.start * q_width..range.end * q_width], kv, shape)
        })
        .collect();
    let mut out = vec![0f32; n * q_width];
    attend_all(&attentions, &mut out);
    Ok(Tensor::from_vec(out, (n, q_width), &Device::Cpu)?)
}

/// The gate's nonlinearity in a gated MLP.
#[derive(Debug, Clone, Copy)]
pub enum Activation {
    /// SwiGLU (llama).
    Silu,
    /// GeGLU with the tanh approximation (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// `down(act(gate(x)) · up(x))`.
#[derive(Debug)]
pub struct GatedMlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
    pub activation: Activation,
}

impl GatedMlp {
    /// `blk.{layer}.ffn_{gate,up,down}.weight`.
    pub fn load(
        reader: &mut TensorReader<'_>,
        layer: usize,
        c: &TransformerConfig,
        activation: Activation,
    ) -> Result<Self> {
        let p = format!("blk.{layer}");
        Ok(Self {
            gate: reader.matrix(&format!("{p}.ffn_gate.weight"), (c.ffn, c.hidden))?,
            up: reader.matrix(&format!("{p}.ffn_up.weight"), (c.ffn, c.hidden))?,
            down: reader.matrix(&format!("{p}.ffn_down.weight"), (c.hidden, c.ffn))?,
            activation,
        })
    }

    pub fn matrices(&self) -> [&Matrix; 3] {
        [&self.gate, &self.up, &self.down]
    }

    pub fn forward(&self, layer: usize, xs: &Tensor, batch: &ForwardContext<'_>) -> Result<Tensor> {
        let [gate, up] = project_many(
            [
                (&self.gate, TargetModule::Gate),
                (&self.up, TargetModule::Up),
            ],
            xs,
            layer,
            batch,
        )?;
        let rows = xs.dim(0)?;
        let gate = product_tensor(gate, rows, &self.gate)?;
        let up = product_tensor(up, rows, &self.up)?;
        let gate = match self.activation {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?,
        };
        let h = (gate * up)?;
        project(&self.down, &h, layer, TargetModule::Down, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The norm equals candle's `rms_norm`, its reference twin, bit for bit: on the calling
    /// thread (few rows) and shared between the cores (a batch, its last chunk short).
    #[test]
    fn rms_norm_equals_candles_bit_for_bit() {
        let width = 96;
        let weight = Tensor::randn(0f32, 1f32, (width,), &Device::Cpu).expect("weight");
        let norm = RmsNorm {
            weight: to_host(&weight).expect("weight values"),
            eps: 1e-5,
        };
        for rows in [1, 7, NORM_ROWS_PER_TASK, 3 * NORM_ROWS_PER_TASK + 5] {
            let xs = Tensor::randn(0f32, 2f32, (rows, width), &Device::Cpu).expect("xs");
            let ours = to_host(&norm.forward(&xs).expect("ours")).expect("values");
            let candle = candle_nn::ops::rms_norm(&xs, &weight, 1e-5).expect("candle");
            let candle = to_host(&candle).expect("values");
            assert!(
                ours.iter()
                    .zip(&candle)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rows = {rows}: differs from candle's rms_norm"
            );
        }
    }
}
