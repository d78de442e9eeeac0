//! Where the LoRA is applied: adapter views as engine tensors, and the per-row-group LoRA term.
//!
//! Adapters are rows, not models: a batch may mix rows under different adapters (none, tenant A
//! v3, θ+εz, θ−εz). The base product `xs·Wᵀ` runs once for the whole batch; then, for each
//! contiguous run of rows that share an adapter view, `xs·Aᵀ·(scale·B)ᵀ` is added to those rows
//! only. Rows with no adapter get nothing added, so their output is exactly the base model's.

use std::sync::Arc;

use adapters::{LoraAdapter, ModelDims, TargetModule};
use candle_core::Tensor;

use super::kernels::PackedMatrix;
use super::weights::with_f32_values;
use super::{EngineError, Result};

/// One adapted module as the forward pass uses it: `A` (`[r, in]`) and `scale·B` (`[out, r]`)
/// as matrices of the engine's kernels, so the LoRA term is two products whose rows, like the
/// base product's, do not depend on the rest of the batch.
#[derive(Debug, Clone)]
struct LoraPair {
    a: PackedMatrix,
    b_scaled: PackedMatrix,
}

impl LoraPair {
    /// `xs·Aᵀ·(scale·B)ᵀ` for `rows` rows of `xs`.
    fn delta(&self, xs: &[f32], rows: usize) -> Vec<f32> {
        let hidden = self.a.matmul_t_new(xs, rows);
        self.b_scaled.matmul_t_new(&hidden, rows)
    }
}

/// An immutable LoRA adapter turned into engine tensors. Cheap to share (`Arc`); building one
/// copies the adapter's small f32 data once.
#[derive(Debug)]
pub struct AdapterView {
    /// `layers[l][module as usize]`.
    layers: Vec<[Option<LoraPair>; 7]>,
    size_bytes: usize,
}

fn module_index(module: TargetModule) -> usize {
    TargetModule::ALL
        .iter()
        .position(|&m| m == module)
        .expect("TargetModule::ALL lists every module")
}

impl AdapterView {
    /// Builds the view, checking the adapter was made for a model of these dimensions.
    pub fn new(adapter: &LoraAdapter, dims: &ModelDims) -> Result<Arc<Self>> {
        if adapter.dims != *dims {
            return Err(EngineError::AdapterMismatch(format!(
                "adapter was made for {:?}, the loaded model is {:?}",
                adapter.dims, dims
            )));
        }
        let scale = adapter.config.scale();
        let mut layers: Vec<[Option<LoraPair>; 7]> =
            (0..dims.n_layer).map(|_| Default::default()).collect();
        let mut size_bytes = 0;
        for (&(layer, module), lora) in &adapter.layers {
            let (in_dim, out_dim) = module.dims(dims);
            if layer >= dims.n_layer || lora.in_dim != in_dim || lora.out_dim != out_dim {
                return Err(EngineError::AdapterMismatch(format!(
                    "layer {layer} {module}: adapter is {}×{}, the model needs {in_dim}×{out_dim}",
                    lora.in_dim, lora.out_dim
                )));
            }
            let b_scaled: Vec<f32> = lora.b.iter().map(|&b| b * scale).collect();
            let pair = LoraPair {
                a: PackedMatrix::from_f32(&lora.a, lora.rank, in_dim),
                b_scaled: PackedMatrix::from_f32(&b_scaled, out_dim, lora.rank),
            };
            size_bytes += (lora.a.len() + lora.b.len()) * 4;
            layers[layer][module_index(module)] = Some(pair);
        }
        Ok(Arc::new(Self { layers, size_bytes }))
    }

    pub fn size_bytes(&self) -> usize {
        self.size_bytes
    }

    /// The lowest layer this view changes (the layer count when it changes none): below it, a
    /// row under this view computes exactly what the base model does.
    pub fn first_adapted_layer(&self) -> usize {
        self.layers
            .iter()
            .position(|modules| modules.iter().any(Option::is_some))
            .unwrap_or(self.layers.len())
    }

    fn pair(&self, layer: usize, module: TargetModule) -> Option<&LoraPair> {
        self.layers.get(layer)?[module_index(module)].as_ref()
    }
}

/// A contiguous run of token rows in a packed batch that share one adapter view.
#[derive(Debug, Clone)]
pub struct AdapterSegment<'a> {
    pub start: usize,
    pub len: usize,
    pub view: Option<&'a AdapterView>,
}

/// Adds the LoRA term of `module` in `layer` to `ys = xs·Wᵀ`, segment by segment.
///
/// `xs` is the module's input `[n, in]`, `ys` its base output, row-major `[n, out]`, changed
/// in place (the caller turns it into a tensor once, with no copy).
pub fn add_lora(
    xs: &Tensor,
    ys: &mut [f32],
    layer: usize,
    module: TargetModule,
    segments: &[AdapterSegment<'_>],
) -> Result<()> {
    let adapted: Vec<(&AdapterSegment<'_>, &LoraPair)> = segments
        .iter()
        .filter_map(|s| Some((s, s.view?.pair(layer, module)?)))
        .collect();
    if adapted.is_empty() {
        return Ok(());
    }
    let (n, in_dim) = xs.dims2()?;
    let out_dim = ys.len() / n.max(1);
    with_f32_values(xs, |xs| {
        for (segment, pair) in adapted {
            let rows = segment.start..segment.start + segment.len;
            let delta = pair.delta(&xs[rows.start * in_dim..rows.end * in_dim], segment.len);
            for (y, d) in ys[rows.start * out_dim..rows.end * out_dim]
                .iter_mut()
                .zip(delta)
            {
                *y += d;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use adapters::LoraConfig;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn tiny_dims() -> ModelDims {
        ModelDims {
            n_layer: 2,
            hidden: 16,
            n_head: 4,
            n_kv_head: 2,
            head_dim: 4,
            ffn: 24,
            qk_rows: adapters::QkRowOrder::HuggingFace,
        }
    }

    /// `ys + scale·B·A·x` for the rows in `adapted`, computed with plain loops.
    fn expected(
        xs: &[f32],
        ys: &[f32],
        lora: &adapters::LoraLayer,
        scale: f32,
        adapted: std::ops::Range<usize>,
    ) -> Vec<f32> {
        let (n_in, n_out, r) = (lora.in_dim, lora.out_dim, lora.rank);
        let mut out = ys.to_vec();
        for row in adapted {
            let x = &xs[row * n_in..(row + 1) * n_in];
            let ax: Vec<f32> = (0..r)
                .map(|k| (0..n_in).map(|i| lora.a[k * n_in + i] * x[i]).sum())
                .collect();
            for o in 0..n_out {
                let bax: f32 = (0..r).map(|k| lora.b[o * r + k] * ax[k]).sum();
                out[row * n_out + o] += scale * bax;
            }
        }
        out
    }

    #[test]
    fn lora_term_matches_x_at_bt_times_alpha_over_r_on_its_rows_only() {
        let dims = tiny_dims();
        let config = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: vec![TargetModule::Gate],
            use_rslora: false,
            layers: None,
        };
        let mut adapter = LoraAdapter::new_initialized(config, dims, 11).expect("adapter");
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for layer in adapter.layers.values_mut() {
            layer
                .b
                .iter_mut()
                .for_each(|b| *b = rng.gen_range(-1.0..1.0));
        }
        let view = AdapterView::new(&adapter, &dims).expect("view");
        let (n, n_in, n_out) = (5, dims.hidden, dims.ffn);
        let xs: Vec<f32> = (0..n * n_in).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let ys: Vec<f32> = (0..n * n_out).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let xs_t = Tensor::from_slice(&xs, (n, n_in), &Device::Cpu).expect("xs");
        let segments = [
            AdapterSegment {
                start: 0,
                len: 2,
                view: Some(&view),
            },
            AdapterSegment {
                start: 2,
                len: 3,
                view: None,
            },
        ];
        let mut got = ys.clone();
        add_lora(&xs_t, &mut got, 1, TargetModule::Gate, &segments).expect("add_lora");
        let lora = &adapter.layers[&(1, TargetModule::Gate)];
        let want = expected(&xs, &ys, lora, 2.0, 0..2);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5, "{g} vs {w}");
        }
        // Rows without an adapter are untouched, bit for bit.
        assert_eq!(&got[2 * n_out..], &ys[2 * n_out..]);
    }

    #[test]
    fn modules_the_adapter_does_not_target_are_untouched() {
        let dims = tiny_dims();
        let adapter = LoraAdapter::new_initialized(LoraConfig::default(), dims, 1).expect("a");
        let view = AdapterView::new(&adapter, &dims).expect("view");
        let xs = Tensor::ones((3, dims.hidden), candle_core::DType::F32, &Device::Cpu).expect("xs");
        let ys = vec![1f32; 3 * dims.ffn];
        let segments = [AdapterSegment {
            start: 0,
            len: 3,
            view: Some(&view),
        }];
        let mut out = ys.clone();
        add_lora(&xs, &mut out, 0, TargetModule::Up, &segments).expect("add_lora");
        assert_eq!(out, ys);
    }
}
