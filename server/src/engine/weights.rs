//! How the model's matrices are held in memory, and the matrix product that reads them.
//!
//! Two modes, chosen in config ([`WeightMode`]); both keep the loss surface smooth at MeZO's ε
//! (candle's quantized kernels round activations to 8 bits, which drowns the loss differences of
//! about ε·|∇L| that MeZO measures, so no product goes through them):
//! - `quantized` (the default): matrices keep the GGUF's type (Q4_0, Q4_1, Q8_0, Q5_0, Q5_1,
//!   Q4_K, Q5_K, Q6_K: what Q4_K_M, Q5_K_M, Q6_K and Q8_0 files hold; F16 and BF16), two to
//!   eight times smaller than f32, and every product dequantizes the panel it works on into a
//!   cache-sized f32 buffer ([`super::kernels`]).
//! - `f32`: every matrix is dequantized once at load, and the products read it as it is.
//!
//! Both run the same kernels on the same weights, so they give the same bits: the mode trades
//! memory for the per-product dequantization only. Matrices of other GGML types are
//! dequantized at load in both modes.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
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

/// A weight matrix `W` of shape `[out, in]`, applied as `xs · Wᵀ`, in this engine's panel
/// layout: f32, or blocks of one of the formats the kernels dequantize (f32 activations).
#[derive(Debug, Clone)]
pub struct Matrix(PackedMatrix);

impl Matrix {
    /// Takes a tensor as read from the GGUF and keeps it in the requested mode. In the
    /// quantized mode, tensors of a type the kernels do not read (Q2_K, Q3_K, …) are kept as
    /// f32 like every tensor of the f32 mode: dequantized exactly, never multiplied with
    /// activations rounded to 8 bits.
    pub fn from_qtensor(qtensor: QTensor, mode: WeightMode) -> Result<Self> {
        let dtype = qtensor.dtype();
        if mode == WeightMode::Quantized && dtype != GgmlDType::F32 {
            if let Some(packed) = PackedMatrix::from_qtensor(&qtensor)? {
                return Ok(Matrix(packed));
            }
            tracing::debug!(
                ?dtype,
                "no kernel reads this type in place; the matrix is kept as f32"
            );
        }
        let w = qtensor.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        let (out, inp) = w.dims2()?;
        Ok(Matrix(PackedMatrix::from_f32(
            &w.flatten_all()?.to_vec1()?,
            out,
            inp,
        )))
    }

    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        Ok(self.0.dims())
    }

    /// The type the weights are kept in (`F32` for the f32 mode).
    pub fn dtype(&self) -> GgmlDType {
        self.0.dtype()
    }

    /// `xs · Wᵀ` for `xs` of shape `[n, in]`.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let [ys] = Self::forward_many([self], xs)?;
        Ok(Tensor::from_vec(
            ys,
            (xs.dim(0)?, self.0.dims().0),
            &Device::Cpu,
        )?)
    }

    /// The products of several matrices with the same `xs` `[n, in]`, computed together (one
    /// hand-off to the cores: [`PackedMatrix::products_new`]), as row-major `[n, out]` values
    /// for callers that change them before they become tensors.
    pub fn forward_many<const N: usize>(
        matrices: [&Self; N],
        xs: &Tensor,
    ) -> Result<[Vec<f32>; N]> {
        let rows = xs.dim(0)?;
        with_f32_values(xs, |xs| {
            PackedMatrix::products_new(matrices.map(|m| &m.0), xs, rows)
        })
    }

    /// Rows of `W` selected by `ids` (the embedding lookup), as f32 `[ids.len(), in]`.
    pub fn rows(&self, ids: &Tensor) -> Result<Tensor> {
        let ids: Vec<u32> = ids.to_vec1()?;
        let (_, n_in) = self.0.dims();
        let mut out = vec![0f32; ids.len() * n_in];
        self.0.rows(&ids, &mut out);
        Ok(Tensor::from_vec(out, (ids.len(), n_in), &Device::Cpu)?)
    }

    /// Bytes this matrix occupies in memory.
    pub fn size_bytes(&self) -> usize {
        self.0.size_bytes()
    }
}
