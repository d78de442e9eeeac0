//! How the model's matrices are held in memory, and the matrix product that reads them.
//!
//! Two modes, chosen in config ([`WeightMode`]); both keep the loss surface smooth at MeZO's ε
//! (candle's quantized kernels round activations to 8 bits, which drowns the loss differences of
//! about ε·|∇L| that MeZO measures, so no product goes through them):
//! - `quantized` (the default): matrices keep the GGUF's quantization (Q4_0, Q4_1, Q8_0), four
//!   to eight times smaller than f32, and every product dequantizes the panel it works on
//!   into a cache-sized f32 buffer ([`super::kernels`]).
//! - `f32`: every matrix is dequantized once at load, and the products read it as it is.
//!
//! Both run the same kernels on the same weights, so they give the same bits: the mode trades
//! memory for the per-product dequantization only. Other GGML types use candle's quantized
//! product for few rows and a dequantized GEMM for many.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

use super::kernels::PackedMatrix;
use super::Result;

/// How weight matrices are kept in memory. See the module documentation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WeightMode {
    F32,
    /// The default: see `config/default.toml` for the measurements behind it.
    #[default]
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

/// For GGML types without this engine's kernels: products with at most this many rows use
/// candle's quantized product (8-bit activations), larger ones a dequantized GEMM.
pub const CANDLE_QMATMUL_MAX_ROWS: usize = 8;

/// Runs `f` on the values of an f32 CPU tensor in row-major order: in place when the tensor
/// is contiguous (no copy of a batch's activations per product), from a copy otherwise.
pub fn with_f32_values<T>(xs: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    if xs.is_contiguous() {
        let (storage, layout) = xs.storage_and_layout();
        if let candle_core::Storage::Cpu(cpu) = &*storage {
            let start = layout.start_offset();
            let values = &cpu.as_slice::<f32>()?[start..start + xs.elem_count()];
            return Ok(f(values));
        }
    }
    Ok(f(&xs.flatten_all()?.to_vec1::<f32>()?))
}

/// A weight matrix `W` of shape `[out, in]`, applied as `xs · Wᵀ`.
#[derive(Debug, Clone)]
pub enum Matrix {
    /// In this engine's panel layout: f32, or Q4_0 / Q4_1 / Q8_0 blocks (f32 activations).
    Packed(PackedMatrix),
    /// Other GGML block types, with candle's kernels (8-bit activations in few-row products).
    CandleQuantized {
        qmatmul: QMatMul,
        qtensor: Arc<QTensor>,
    },
}

impl Matrix {
    /// Takes a tensor as read from the GGUF and keeps it in the requested mode. Tensors that are
    /// already f32/f16 in the file are always kept as f32.
    pub fn from_qtensor(qtensor: QTensor, mode: WeightMode) -> Result<Self> {
        let stored_as_float = matches!(
            qtensor.dtype(),
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16
        );
        let packed = if mode == WeightMode::F32 || stored_as_float {
            let w = qtensor.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
            let (out, inp) = w.dims2()?;
            Some(PackedMatrix::from_f32(
                &w.flatten_all()?.to_vec1()?,
                out,
                inp,
            ))
        } else {
            PackedMatrix::from_qtensor(&qtensor)?
        };
        if let Some(packed) = packed {
            return Ok(Matrix::Packed(packed));
        }
        let qtensor = Arc::new(qtensor);
        let qmatmul = QMatMul::from_arc(qtensor.clone())?;
        Ok(Matrix::CandleQuantized { qmatmul, qtensor })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Matrix::Packed(kernel) => kernel.dims(),
            Matrix::CandleQuantized { qtensor, .. } => qtensor.shape().dims2()?,
        })
    }

    /// `xs · Wᵀ` for `xs` of shape `[n, in]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let rows = xs.dim(0)?;
        match self {
            Matrix::Packed(kernel) => {
                let (n_out, _) = kernel.dims();
                let mut ys = vec![0f32; rows * n_out];
                with_f32_values(xs, |xs| kernel.matmul_t(xs, rows, &mut ys))?;
                Ok(Tensor::from_vec(ys, (rows, n_out), &Device::Cpu)?)
            }
            Matrix::CandleQuantized { qmatmul, .. } if rows <= CANDLE_QMATMUL_MAX_ROWS => {
                Ok(qmatmul.forward(&xs.contiguous()?)?)
            }
            Matrix::CandleQuantized { qtensor, .. } => {
                Ok(xs.matmul(&qtensor.dequantize(&Device::Cpu)?.t()?)?)
            }
        }
    }

    /// Rows of `W` selected by `ids` (the embedding lookup), as f32 `[ids.len(), in]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Matrix::Packed(kernel) => {
                let ids: Vec<u32> = ids.to_vec1()?;
                let (_, n_in) = kernel.dims();
                let mut out = vec![0f32; ids.len() * n_in];
                kernel.rows(&ids, &mut out);
                Tensor::from_vec(out, (ids.len(), n_in), &Device::Cpu)?
            }
            Matrix::CandleQuantized { qtensor, .. } => qtensor.embedding(ids)?,
        })
    }

    /// Bytes this matrix occupies in memory.
    pub fn size_bytes(&self) -> usize {
        match self {
            Matrix::Packed(kernel) => kernel.size_bytes(),
            Matrix::CandleQuantized { qtensor, .. } => qtensor.storage_size_in_bytes(),
        }
    }
}
