//! How the model's matrices are held in memory, and the matrix product that reads them.
//!
//! Two modes, chosen in config ([`WeightMode`]):
//! - `f32`: every matrix is dequantized once at load. Batched work (prefill, scoring, training)
//!   runs as dense f32 GEMMs, and the loss surface is smooth at MeZO's ε (DESIGN.md §4: candle's
//!   quantized kernels round activations to 8 bits, which makes finite differences meaningless).
//! - `quantized`: matrices stay as stored in the GGUF (Q4_1, Q8_0, …), four to eight times
//!   smaller. Few-row products (decode) use the quantized kernels, which read less memory;
//!   many-row products dequantize the one matrix they need, use the dense GEMM, and drop it, so
//!   batched and training forwards keep f32 numerics with no lasting second copy.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use super::Result;

/// How weight matrices are kept in memory. See the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    #[default]
    F32,
    Quantized,
}

impl std::fmt::Display for WeightMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightMode::F32 => "f32",
            WeightMode::Quantized => "quantized",
        })
    }
}

/// Products with at most this many rows use the quantized kernel in `quantized` mode; larger
/// ones dequantize the matrix (the dense GEMM wins once the matrix is reused across rows).
pub const QUANTIZED_KERNEL_MAX_ROWS: usize = 8;

/// A weight matrix `W` of shape `[out, in]`, applied as `xs · Wᵀ`.
#[derive(Debug, Clone)]
pub enum Matrix {
    Dense(Tensor),
    Quantized {
        qmatmul: QMatMul,
        qtensor: Arc<QTensor>,
    },
}

impl Matrix {
    /// Takes a tensor as read from the GGUF and keeps it in the requested mode. Tensors that are
    /// already f32/f16 in the file are always kept dense.
    pub fn from_qtensor(qtensor: QTensor, mode: WeightMode) -> Result<Self> {
        let stored_as_float = matches!(
            qtensor.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        if mode == WeightMode::F32 || stored_as_float {
            return Ok(Matrix::Dense(
                qtensor.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?,
            ));
        }
        let qtensor = Arc::new(qtensor);
        let qmatmul = QMatMul::from_arc(qtensor.clone())?;
        Ok(Matrix::Quantized { qmatmul, qtensor })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Matrix::Dense(w) => w.dims2()?,
            Matrix::Quantized { qtensor, .. } => qtensor.shape().dims2()?,
        })
    }

    /// `xs · Wᵀ` for `xs` of shape `[n, in]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Matrix::Dense(w) => Ok(xs.matmul(&w.t()?)?),
            Matrix::Quantized { qmatmul, qtensor } => {
                let rows = xs.dim(0)?;
                if rows <= QUANTIZED_KERNEL_MAX_ROWS {
                    Ok(qmatmul.forward(&xs.contiguous()?)?)
                } else {
                    let w = qtensor.dequantize(&Device::Cpu)?;
                    Ok(xs.matmul(&w.t()?)?)
                }
            }
        }
    }

    /// Rows of `W` selected by `ids` (the embedding lookup), as f32 `[ids.len(), in]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Matrix::Dense(w) => w.index_select(ids, 0)?,
            Matrix::Quantized { qtensor, .. } => qtensor.embedding(ids)?,
        })
    }

    /// Bytes this matrix occupies in memory.
    pub fn size_bytes(&self) -> usize {
        match self {
            Matrix::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Matrix::Quantized { qtensor, .. } => qtensor.storage_size_in_bytes(),
        }
    }
}
