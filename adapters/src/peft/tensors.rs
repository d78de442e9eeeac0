//! `adapter_model.safetensors`: the LoRA matrices under PEFT's state-dict keys, `lora_B` of q/k
//! in Hugging Face's row order (converted from and to the engine's, [`crate::qk_rows`]), and the
//! checks that a file's tensors are exactly those its config and the model call for.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};
use serde_json::Value;

use super::{invalid, KEY_PREFIX, ROW_ORDER_KEY};
use crate::qk_rows::{self, QkRowOrder};
use crate::{AdapterError, LoraAdapter, LoraConfig, LoraLayer, ModelDims, Result, TargetModule};

/// The adapter's tensors as `adapter_model.safetensors` bytes, `lora_B` of q/k in Hugging Face's
/// row order (see [`crate::qk_rows`]), with that order recorded in the file's metadata.
pub(super) fn serialize_weights(adapter: &LoraAdapter) -> Result<Vec<u8>> {
    let config = &adapter.config;
    let mut tensors = Vec::with_capacity(adapter.layers.len() * 2);
    for (&(layer, module), lora) in &adapter.layers {
        check_layer_for_save(config, layer, module, lora)?;
        tensors.push(F32Tensor {
            key: tensor_key(layer, module, Matrix::A),
            shape: [lora.rank, lora.in_dim],
            data: Cow::Borrowed(&lora.a),
        });
        let b = qk_rows::reorder_rows(
            &lora.b,
            lora.rank,
            module,
            &adapter.dims,
            adapter.dims.qk_rows,
            QkRowOrder::HuggingFace,
        );
        tensors.push(F32Tensor {
            key: tensor_key(layer, module, Matrix::B),
            shape: [lora.out_dim, lora.rank],
            data: Cow::Owned(b),
        });
    }
    let metadata = [
        // PyTorch tooling (transformers' loader among them) checks for this marker.
        ("format", "pt"),
        (ROW_ORDER_KEY, QkRowOrder::HuggingFace.as_str()),
    ];
    Ok(safetensors_bytes(&tensors, &metadata))
}

/// A safetensors file of f32 `tensors` with `metadata`, written here rather than by
/// `safetensors::serialize`, whose metadata is a `HashMap` serialised in random order: the same
/// adapter must always give the same bytes (replay and resume are checked byte for byte).
pub(super) fn safetensors_bytes(tensors: &[F32Tensor<'_>], metadata: &[(&str, &str)]) -> Vec<u8> {
    let metadata: serde_json::Map<String, Value> = metadata
        .iter()
        .map(|&(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect();
    let mut header = format!("{{\"__metadata__\":{}", Value::Object(metadata));
    let mut offset = 0;
    for tensor in tensors {
        let end = offset + std::mem::size_of_val(tensor.data.as_ref());
        let info = serde_json::json!({
            "dtype": "F32",
            "shape": tensor.shape,
            "data_offsets": [offset, end],
        });
        header.push_str(&format!(",{}:{info}", Value::String(tensor.key.clone())));
        offset = end;
    }
    header.push('}');
    // The format pads the header with spaces so that the data starts 8-byte aligned.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for tensor in tensors {
        bytes.extend(tensor.data.iter().flat_map(|v| v.to_le_bytes()));
    }
    bytes
}

pub(super) fn parse_row_order(path: &Path, value: &Value) -> Result<QkRowOrder> {
    serde_json::from_value(value.clone()).map_err(|_| {
        invalid(
            path,
            format!(
                "its metadata `{ROW_ORDER_KEY}` is {value}, expected \"{}\" or \"{}\"",
                QkRowOrder::HuggingFace.as_str(),
                QkRowOrder::GgufInterleaved.as_str()
            ),
        )
    })
}

/// Which matrix of a LoRA pair a tensor holds.
#[derive(Clone, Copy)]
pub(super) enum Matrix {
    A,
    B,
}

/// The PEFT state-dict key of one LoRA matrix, e.g.
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
pub(super) fn tensor_key(layer: usize, module: TargetModule, matrix: Matrix) -> String {
    let matrix = match matrix {
        Matrix::A => "lora_A",
        Matrix::B => "lora_B",
    };
    format!("{KEY_PREFIX}{}.{matrix}.weight", module.module_path(layer))
}

/// Refuses to write a layer whose data does not match its shape: safetensors takes the byte
/// counts on trust, so a mismatch would produce a file that no loader accepts.
fn check_layer_for_save(
    config: &LoraConfig,
    layer: usize,
    module: TargetModule,
    lora: &LoraLayer,
) -> Result<()> {
    let problem = if !config.targets.contains(&module) {
        Some(format!(
            "it has weights for {module}, which is not in its targets"
        ))
    } else if lora.rank != config.rank {
        Some(format!(
            "its rank is {} but the config says {}",
            lora.rank, config.rank
        ))
    } else if lora.a.len() != lora.rank * lora.in_dim || lora.b.len() != lora.out_dim * lora.rank {
        Some(format!(
            "A holds {} values and B {}, but rank {} with {} inputs and {} outputs needs {} and {}",
            lora.a.len(),
            lora.b.len(),
            lora.rank,
            lora.in_dim,
            lora.out_dim,
            lora.rank * lora.in_dim,
            lora.out_dim * lora.rank
        ))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(AdapterError::InvalidConfig(format!(
            "cannot save the adapter's layer {layer} {module}: {problem}; this is a bug in the \
             code that built the adapter"
        ))),
        None => Ok(()),
    }
}

/// One f32 matrix of an adapter file, by its PEFT key.
pub(super) struct F32Tensor<'a> {
    key: String,
    shape: [usize; 2],
    data: Cow<'a, [f32]>,
}

/// Checks the tensors against the config and the model, and builds the layers from them.
pub(super) fn parse_tensors(
    path: &Path,
    bytes: &[u8],
    config: &LoraConfig,
    dims: &ModelDims,
    unmarked_order: Option<QkRowOrder>,
) -> Result<BTreeMap<(usize, TargetModule), LoraLayer>> {
    let not_safetensors = |e: SafeTensorError| {
        invalid(
            path,
            format!(
                "not a valid safetensors file ({e}); re-export the adapter with PEFT's \
                 save_pretrained"
            ),
        )
    };
    let file = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let declared = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(ROW_ORDER_KEY));
    let stored_order = match declared {
        Some(order) => parse_row_order(path, &Value::String(order.clone()))?,
        None => unmarked_order.unwrap_or(QkRowOrder::HuggingFace),
    };

    let expected: HashSet<String> = (0..dims.n_layer)
        .filter(|&layer| config.adapts_layer(layer))
        .flat_map(|layer| {
            config.targets.iter().flat_map(move |&module| {
                [Matrix::A, Matrix::B].map(|matrix| tensor_key(layer, module, matrix))
            })
        })
        .collect();
    let pattern = format!(
        "with target_modules [{}] the file must hold exactly \
         `{KEY_PREFIX}model.layers.<layer>.<self_attn|mlp>.<module>.lora_A.weight` and \
         `….lora_B.weight` for each module and {}",
        config
            .targets
            .iter()
            .map(|m| m.peft_name())
            .collect::<Vec<_>>()
            .join(", "),
        match &config.layers {
            None => format!("layers 0..{}", dims.n_layer),
            Some(layers) => format!("the layers of layers_to_transform {layers:?}"),
        }
    );

    // Sorted so that, of several unexpected tensors, the same one is reported every time.
    let mut names = file.names();
    names.sort_unstable();
    if let Some(name) = names.into_iter().find(|name| !expected.contains(*name)) {
        return Err(invalid(
            path,
            unexpected_tensor(name, config, dims, &pattern),
        ));
    }

    let read_matrix = |key: String, want: [usize; 2]| -> Result<Vec<f32>> {
        let tensor = match file.tensor(&key) {
            Ok(tensor) => tensor,
            // Every tensor in the file is an expected one, so the difference is what is missing.
            Err(SafeTensorError::TensorNotFound(_)) => {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{key}` is missing ({} of the {} expected tensors are absent); \
                         {pattern}; the adapter is incomplete or for a model with other dimensions",
                        expected.len() - file.len(),
                        expected.len()
                    ),
                ))
            }
            Err(e) => return Err(invalid(path, format!("cannot read tensor `{key}`: {e}"))),
        };
        if tensor.shape() != want {
            return Err(invalid(
                path,
                format!(
                    "tensor `{key}` has shape {:?}, expected {want:?} ([r, in] for lora_A, \
                     [out, r] for lora_B, with r = {}); the adapter was trained for another \
                     base model or with another r",
                    tensor.shape(),
                    config.rank
                ),
            ));
        }
        to_f32(path, &key, &tensor)
    };

    let mut layers = BTreeMap::new();
    for layer in (0..dims.n_layer).filter(|&layer| config.adapts_layer(layer)) {
        for &module in &config.targets {
            let (in_dim, out_dim) = module.dims(dims);
            let b = read_matrix(tensor_key(layer, module, Matrix::B), [out_dim, config.rank])?;
            let lora = LoraLayer {
                in_dim,
                out_dim,
                rank: config.rank,
                a: read_matrix(tensor_key(layer, module, Matrix::A), [config.rank, in_dim])?,
                b: qk_rows::reorder_rows(&b, config.rank, module, dims, stored_order, dims.qk_rows),
            };
            layers.insert((layer, module), lora);
        }
    }
    Ok(layers)
}

/// Explains a tensor the config does not call for, naming the likeliest cause.
fn unexpected_tensor(name: &str, config: &LoraConfig, dims: &ModelDims, pattern: &str) -> String {
    let layer = name
        .strip_prefix(KEY_PREFIX)
        .and_then(|rest| rest.strip_prefix("model.layers."))
        .and_then(|rest| rest.split('.').next())
        .and_then(|index| index.parse::<usize>().ok());
    if let Some(layer) = layer.filter(|&l| l >= dims.n_layer) {
        format!(
            "tensor `{name}` is for layer {layer}, but the base model has {} layers; the \
             adapter was trained for another base model",
            dims.n_layer
        )
    } else if let Some(layer) = layer.filter(|&l| !config.adapts_layer(l)) {
        format!(
            "tensor `{name}` is for layer {layer}, which layers_to_transform does not list; \
             {pattern}: add the layer to layers_to_transform or remove its tensors"
        )
    } else if name.ends_with(".default.weight") {
        format!(
            "tensor `{name}` carries PEFT's adapter name (`.default`); {pattern}: export the \
             adapter with PEFT's save_pretrained, which strips the name"
        )
    } else {
        format!("unexpected tensor `{name}`; {pattern}: remove it or correct target_modules")
    }
}

/// Widens a tensor's little-endian data to f32, refusing dtypes a LoRA adapter is not stored in
/// and non-finite values, which would turn every output of the model into NaN.
pub(super) fn to_f32(path: &Path, name: &str, tensor: &TensorView<'_>) -> Result<Vec<f32>> {
    let data = tensor.data();
    let values: Vec<f32> = match tensor.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(invalid(
                path,
                format!(
                    "tensor `{name}` is {other}; LoRA weights must be F32, F16 or BF16: \
                     re-export the adapter in one of those"
                ),
            ))
        }
    };
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(invalid(
            path,
            format!(
                "tensor `{name}` holds {} at index {i}; the adapter diverged in training, so \
                 use an earlier checkpoint",
                values[i]
            ),
        ));
    }
    Ok(values)
}
