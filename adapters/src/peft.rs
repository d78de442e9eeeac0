//! PEFT-format adapter directories: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! [`save`] writes an adapter in the layout Hugging Face PEFT's `save_pretrained` produces, so
//! tools that read PEFT adapters (transformers + PEFT, vLLM, llama.cpp's converter) can use it.
//! [`load`] reads such a directory back and checks it against the base model's dimensions.
//! Files are always in PEFT's (Hugging Face's) row order; adapters in memory follow the engine's
//! ([`ModelDims::qk_rows`]), and the two convert here, through [`crate::qk_rows`].
//! PEFT can express much more than this engine computes (DoRA, per-module ranks, trained biases,
//! full copies of other modules, …); loading refuses every such adapter with an error naming the
//! feature, because silently dropping part of an adapter would serve a different model than the
//! one trained.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::qk_rows::{self, QkRowOrder};
use crate::{AdapterError, LoraAdapter, LoraConfig, LoraLayer, ModelDims, Result, TargetModule};

/// The adapter's hyperparameters, in PEFT's `LoraConfig` JSON.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's tensors.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's older pickle format, which is refused (reading pickles can run arbitrary code).
const PICKLE_WEIGHTS_FILE: &str = "adapter_model.bin";
/// `PeftModelForCausalLM` wraps the base model as `base_model.model`, so PEFT's keys carry it.
const KEY_PREFIX: &str = "base_model.model.";
/// The safetensors metadata key recording the q/k `lora_B` row order of the file's tensors
/// (always Hugging Face's when this server writes it; PEFT ignores the key).
const ROW_ORDER_KEY: &str = "mezo.qk_row_order";
/// A safetensors header is JSON naming each tensor; an adapter's is a few hundred KiB at most.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Writes `adapter` into `dir` (created if missing) as a PEFT LoRA adapter.
///
/// Each file is replaced atomically, so a reader sees either the old or the new version of it,
/// never a torn one. The pair is not replaced atomically: the tensors are written first and the
/// config last, so a directory that has a config has its tensors, but a reader racing a save
/// that overwrites an adapter of another shape can see new tensors with the old config. Save a
/// new version into a fresh directory when readers may be looking.
///
/// # Errors
///
/// [`AdapterError::InvalidConfig`] if the adapter's config or data are inconsistent (nothing is
/// written then), [`AdapterError::Io`] if the directory or a file cannot be written.
pub fn save(adapter: &LoraAdapter, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    let config = &adapter.config;
    config.validate()?;
    let weights = serialize_weights(adapter)?;

    let config_json = PeftConfigOut {
        base_model_name_or_path,
        bias: "none",
        fan_in_fan_out: false,
        inference_mode: true,
        init_lora_weights: true,
        layers_pattern: None,
        layers_to_transform: config.layers.as_deref(),
        lora_alpha: config.alpha,
        lora_dropout: 0.0,
        modules_to_save: None,
        peft_type: "LORA",
        r: config.rank,
        target_modules: config.targets.iter().map(|m| m.peft_name()).collect(),
        task_type: "CAUSAL_LM",
        use_dora: false,
        use_rslora: config.use_rslora,
    };
    let config_json = serde_json::to_string_pretty(&config_json)
        .map_err(|e| AdapterError::InvalidConfig(format!("cannot serialise the config: {e}")))?;

    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    write_atomically(dir, WEIGHTS_FILE, &weights)?;
    write_atomically(dir, CONFIG_FILE, config_json.as_bytes())
}

/// The adapter's tensors as `adapter_model.safetensors` bytes, `lora_B` of q/k in Hugging Face's
/// row order (see [`crate::qk_rows`]), with that order recorded in the file's metadata.
fn serialize_weights(adapter: &LoraAdapter) -> Result<Vec<u8>> {
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
fn safetensors_bytes(tensors: &[F32Tensor<'_>], metadata: &[(&str, &str)]) -> Vec<u8> {
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

/// The q/k row order that the tensors in `dir` declare, or `None` for a file that does not say
/// (PEFT's own files, which are in Hugging Face's order, and folders published by versions of
/// this server before it recorded the order, which are in the engine's). Reads only the
/// safetensors header.
///
/// # Errors
///
/// [`AdapterError::Io`] if the file cannot be read, [`AdapterError::InvalidFile`] if its header
/// is malformed or names an unknown order.
pub fn stored_row_order(dir: &Path) -> Result<Option<QkRowOrder>> {
    let path = dir.join(WEIGHTS_FILE);
    let io = |source| AdapterError::Io {
        path: path.clone(),
        source,
    };
    let mut file = File::open(&path).map_err(io)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(io)?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        return Err(invalid(
            &path,
            format!(
                "its safetensors header claims {len} bytes; the file is not a safetensors file"
            ),
        ));
    }
    let mut header = Vec::new();
    file.take(len).read_to_end(&mut header).map_err(io)?;
    let header: Value = serde_json::from_slice(&header)
        .map_err(|e| invalid(&path, format!("its safetensors header is not JSON ({e})")))?;
    header
        .get("__metadata__")
        .and_then(|m| m.get(ROW_ORDER_KEY))
        .map(|order| parse_row_order(&path, order))
        .transpose()
}

fn parse_row_order(path: &Path, value: &Value) -> Result<QkRowOrder> {
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

/// Rewrites the tensors of a folder that an earlier version of this server published, whose
/// unmarked q/k `lora_B` rows are in the engine's order (`dims.qk_rows`), into PEFT's order with
/// the order recorded. Only the tensors file is replaced (atomically), so an interrupted
/// conversion leaves either the old file, converted again next time, or the new one.
///
/// # Errors
///
/// As [`load_limited`], and [`AdapterError::Io`] if the file cannot be replaced.
pub fn convert_engine_order_folder(dir: &Path, dims: &ModelDims, max_bytes: u64) -> Result<()> {
    let adapter = load_stored(dir, dims, max_bytes, Some(dims.qk_rows))?;
    write_atomically(dir, WEIGHTS_FILE, &serialize_weights(&adapter)?)
}

/// Reads the PEFT LoRA adapter in `dir` for a base model of the given dimensions.
///
/// # Errors
///
/// [`AdapterError::Io`] if the directory or a file is missing or unreadable,
/// [`AdapterError::InvalidFile`] if a file is malformed or does not fit `dims`, and
/// [`AdapterError::UnsupportedFeature`] if the adapter uses PEFT features this engine does not
/// implement. Nothing is loaded in part.
pub fn load(dir: &Path, dims: &ModelDims) -> Result<LoraAdapter> {
    load_limited(dir, dims, u64::MAX)
}

/// Like [`load`], but refuses either file if it is larger than `max_bytes`, before reading it
/// into memory, so an upload cannot exhaust the server's memory.
///
/// # Errors
///
/// As [`load`], and [`AdapterError::InvalidFile`] naming the size and the limit for a file over
/// the limit.
pub fn load_limited(dir: &Path, dims: &ModelDims, max_bytes: u64) -> Result<LoraAdapter> {
    load_stored(dir, dims, max_bytes, None)
}

/// Loads `dir`, whose unmarked tensors are taken to be in `unmarked_order` (`None`: PEFT's).
fn load_stored(
    dir: &Path,
    dims: &ModelDims,
    max_bytes: u64,
    unmarked_order: Option<QkRowOrder>,
) -> Result<LoraAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let config_text = read_limited(&config_path, max_bytes)?;
    let config = parse_config(&config_path, &config_text)?;
    config.validate_for(dims.n_layer).map_err(|e| {
        invalid(
            &config_path,
            format!("{e}; the adapter was trained for another base model"),
        )
    })?;

    let weights_path = dir.join(WEIGHTS_FILE);
    let weights = match read_limited(&weights_path, max_bytes) {
        Err(AdapterError::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
                && dir.join(PICKLE_WEIGHTS_FILE).exists() =>
        {
            return Err(AdapterError::UnsupportedFeature {
                path: dir.join(PICKLE_WEIGHTS_FILE),
                feature: "pickled weights (adapter_model.bin)".into(),
                hint: format!(
                    "convert the adapter to {WEIGHTS_FILE}: load it with PEFT and call \
                     save_pretrained(dir, safe_serialization=True)"
                ),
            });
        }
        other => other?,
    };
    let layers = parse_tensors(&weights_path, &weights, &config, dims, unmarked_order)?;
    Ok(LoraAdapter {
        config,
        dims: *dims,
        layers,
    })
}

/// Which matrix of a LoRA pair a tensor holds.
#[derive(Clone, Copy)]
enum Matrix {
    A,
    B,
}

/// The PEFT state-dict key of one LoRA matrix, e.g.
/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`.
fn tensor_key(layer: usize, module: TargetModule, matrix: Matrix) -> String {
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
struct F32Tensor<'a> {
    key: String,
    shape: [usize; 2],
    data: Cow<'a, [f32]>,
}

/// `adapter_config.json` as written. Fields are in alphabetical order because PEFT writes its
/// keys sorted, which keeps our files diffable against PEFT's.
#[derive(Serialize)]
struct PeftConfigOut<'a> {
    base_model_name_or_path: &'a str,
    bias: &'static str,
    fan_in_fan_out: bool,
    inference_mode: bool,
    init_lora_weights: bool,
    /// PEFT finds llama's `model.layers.<i>` without a pattern.
    layers_pattern: Option<&'static str>,
    layers_to_transform: Option<&'a [usize]>,
    lora_alpha: f32,
    lora_dropout: f32,
    modules_to_save: Option<Vec<String>>,
    peft_type: &'static str,
    r: usize,
    target_modules: Vec<&'static str>,
    task_type: &'static str,
    use_dora: bool,
    use_rslora: bool,
}

/// `adapter_config.json` as read: the fields this engine uses, plus everything else for the
/// checks that refuse features it does not implement. Fields PEFT always writes are required.
#[derive(Deserialize)]
struct PeftConfigIn {
    peft_type: String,
    r: usize,
    lora_alpha: f32,
    #[serde(default)]
    target_modules: Value,
    #[serde(default)]
    use_rslora: bool,
    #[serde(flatten)]
    other: serde_json::Map<String, Value>,
}

/// Whether a config value asks for something: PEFT's "off" is null, false, or an empty
/// list, dict or string, depending on the field.
fn is_set(value: &Value) -> bool {
    match value {
        Value::Null | Value::Bool(false) => false,
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::String(s) => !s.is_empty(),
        Value::Bool(true) | Value::Number(_) => true,
    }
}

/// Config fields whose non-default values change what the adapter computes, with what to do
/// instead. Anything else PEFT writes (dropout, revision, auto_mapping, …) does not matter for
/// serving or is checked separately.
const UNSUPPORTED_FIELDS: &[(&str, &str)] = &[
    (
        "use_dora",
        "DoRA needs per-column magnitudes that this engine does not apply; retrain with \
         use_dora=False, or merge the adapter into the base model and serve that",
    ),
    (
        "modules_to_save",
        "the adapter carries full trained copies of these modules, which this engine cannot \
         swap in; retrain with modules_to_save=None, or merge the adapter into the base model \
         and serve that",
    ),
    (
        "rank_pattern",
        "per-module ranks are not supported; retrain with one r for every module",
    ),
    (
        "alpha_pattern",
        "per-module alphas are not supported; retrain with one lora_alpha for every module",
    ),
    (
        "fan_in_fan_out",
        "llama's projections are nn.Linear, stored out × in; retrain with fan_in_fan_out=False",
    ),
    (
        "lora_bias",
        "trained biases on lora_B are not applied by this engine; retrain with lora_bias=False",
    ),
    (
        "use_qalora",
        "QALoRA pools the input before A, which this engine does not do; retrain without it",
    ),
    (
        "layer_replication",
        "layer replication changes the base model's depth; retrain without it",
    ),
    (
        "exclude_modules",
        "this engine adapts every layer of each target module; retrain without exclude_modules",
    ),
    (
        "target_parameters",
        "only linear modules (target_modules) can be adapted; retrain without target_parameters",
    ),
    (
        "trainable_token_indices",
        "trained embedding rows are not applied by this engine; retrain without them",
    ),
    (
        "alora_invocation_tokens",
        "activated LoRA (applied only after invocation tokens) is not supported; retrain as a \
         plain LoRA",
    ),
];

fn unsupported(path: &Path, feature: impl Into<String>, hint: impl Into<String>) -> AdapterError {
    AdapterError::UnsupportedFeature {
        path: path.to_path_buf(),
        feature: feature.into(),
        hint: hint.into(),
    }
}

fn invalid(path: &Path, reason: impl Into<String>) -> AdapterError {
    AdapterError::InvalidFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// The supported target modules as PEFT names them, for error messages.
fn supported_targets() -> String {
    TargetModule::ALL.map(TargetModule::peft_name).join(", ")
}

/// Parses `adapter_config.json` into a [`LoraConfig`], refusing anything it cannot express.
fn parse_config(path: &Path, text: &[u8]) -> Result<LoraConfig> {
    let file: PeftConfigIn = serde_json::from_slice(text).map_err(|e| {
        invalid(
            path,
            format!(
                "not a valid PEFT adapter config ({e}); fix the JSON or re-export the adapter \
                 with PEFT's save_pretrained"
            ),
        )
    })?;

    if file.peft_type != "LORA" {
        return Err(unsupported(
            path,
            format!("peft_type = {:?}", file.peft_type),
            "only LoRA adapters (peft_type \"LORA\") can be served; train a LoRA adapter",
        ));
    }
    // Other task types wrap the model differently (different key prefixes, extra heads).
    match file.other.get("task_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "CAUSAL_LM" => {}
        Some(t) => {
            return Err(unsupported(
                path,
                format!("task_type = {t}"),
                "this server runs causal language models; use an adapter trained with \
                 task_type=\"CAUSAL_LM\"",
            ))
        }
    }
    for &(field, hint) in UNSUPPORTED_FIELDS {
        if let Some(value) = file.other.get(field).filter(|v| is_set(v)) {
            return Err(unsupported(path, format!("{field} = {value}"), hint));
        }
    }
    let layers = parse_layers(path, file.other.get("layers_to_transform"))?;
    match file.other.get("layers_pattern") {
        None | Some(Value::Null) => {}
        Some(Value::String(p)) if p == "layers" => {}
        Some(Value::Array(p)) if p.len() == 1 && p[0] == "layers" => {}
        Some(pattern) => {
            return Err(unsupported(
                path,
                format!("layers_pattern = {pattern}"),
                "llama's layers are `model.layers.<i>`; retrain with layers_pattern=None (or \
                 \"layers\")",
            ))
        }
    }
    match file.other.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(b) => {
            return Err(unsupported(
                path,
                format!("bias = {b}"),
                "trained biases are not applied by this engine; retrain with bias=\"none\"",
            ))
        }
    }
    // PiSSA, OLoRA, CorDA and LoftQ start by rewriting the base model's weights, so such an
    // adapter is only right on top of that rewritten model; the other initialisations only pick
    // the adapter's starting point.
    match file.other.get("init_lora_weights") {
        None | Some(Value::Null | Value::Bool(_)) => {}
        Some(Value::String(s)) if ["gaussian", "eva", "orthogonal"].contains(&s.as_str()) => {}
        Some(init) => {
            return Err(unsupported(
                path,
                format!("init_lora_weights = {init}"),
                "this initialisation changes the base model's weights, so the adapter only fits \
                 that changed model; export it with PEFT's save_pretrained(..., \
                 path_initial_model_for_weight_conversion=...) so it applies to the original \
                 model",
            ))
        }
    }

    let config = LoraConfig {
        rank: file.r,
        alpha: file.lora_alpha,
        targets: parse_targets(path, &file.target_modules)?,
        use_rslora: file.use_rslora,
        layers,
    };
    config
        .validate()
        .map_err(|e| invalid(path, format!("{e}")))?;
    Ok(config)
}

/// PEFT's `layers_to_transform`: absent or null for every layer, one index, or a list of
/// indices (kept sorted and unique, which is how PEFT treats it: a membership test).
fn parse_layers(path: &Path, value: Option<&Value>) -> Result<Option<Vec<usize>>> {
    let index = |item: &Value| -> Result<usize> {
        item.as_u64()
            .and_then(|i| usize::try_from(i).ok())
            .ok_or_else(|| {
                invalid(
                    path,
                    format!(
                        "layers_to_transform must be a layer index or a list of them, found \
                         {item}"
                    ),
                )
            })
    };
    let layers = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(items)) => items.iter().map(index).collect::<Result<Vec<_>>>()?,
        Some(item) => vec![index(item)?],
    };
    if layers.is_empty() {
        return Err(invalid(
            path,
            "layers_to_transform is an empty list, so the adapter changes no layer; list the \
             adapted layers, or set it to null to adapt every layer",
        ));
    }
    Ok(Some(LoraConfig::normalized_layers(layers)))
}

/// PEFT's `target_modules`: a list of module names, or a string that PEFT treats as a regular
/// expression over full module paths. Strings are accepted only when their meaning is plain.
fn parse_targets(path: &Path, value: &Value) -> Result<Vec<TargetModule>> {
    let names: Vec<&str> = match value {
        Value::String(s) if s == "all-linear" => {
            // PEFT's shorthand for every linear layer but the output head: all seven in llama.
            return Ok(TargetModule::ALL.to_vec());
        }
        Value::String(s) if peft_target(s).is_some() => vec![s],
        Value::String(s) => {
            return Err(unsupported(
                path,
                format!("target_modules as a regular expression ({s:?})"),
                format!(
                    "list the adapted modules instead, e.g. [\"q_proj\", \"v_proj\"]; supported: \
                     {}",
                    supported_targets()
                ),
            ))
        }
        Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str().ok_or_else(|| {
                    invalid(
                        path,
                        format!("target_modules must be a list of module names, found {item}"),
                    )
                })
            })
            .collect::<Result<_>>()?,
        Value::Null => {
            return Err(invalid(
                path,
                format!(
                    "target_modules is missing; list the adapted modules, e.g. [\"q_proj\", \
                     \"v_proj\"] (supported: {})",
                    supported_targets()
                ),
            ))
        }
        other => {
            return Err(invalid(
                path,
                format!("target_modules must be a list of module names, found {other}"),
            ))
        }
    };

    let mut targets = Vec::with_capacity(names.len());
    for name in names {
        let Some(module) = peft_target(name) else {
            // The short forms our own configs accept are not module names PEFT would match.
            let hint = match name.parse::<TargetModule>() {
                Ok(m) => format!(
                    "PEFT names that module `{}`; write that instead",
                    m.peft_name()
                ),
                Err(_) => format!(
                    "only {} can be adapted (not embeddings or lm_head); retrain without `{name}`",
                    supported_targets()
                ),
            };
            return Err(unsupported(
                path,
                format!("target_modules entry {name:?}"),
                hint,
            ));
        };
        // PEFT keeps target_modules as a set, so repeats mean nothing; the file's order is kept
        // so that a saved adapter loads back equal.
        if !targets.contains(&module) {
            targets.push(module);
        }
    }
    Ok(targets)
}

/// The target module with exactly this PEFT name (`q_proj`, …).
fn peft_target(name: &str) -> Option<TargetModule> {
    TargetModule::ALL
        .into_iter()
        .find(|m| m.peft_name() == name)
}

/// Checks the tensors against the config and the model, and builds the layers from them.
fn parse_tensors(
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
fn to_f32(path: &Path, name: &str, tensor: &TensorView<'_>) -> Result<Vec<f32>> {
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

/// Reads a whole file, refusing it if it is larger than `max_bytes`.
fn read_limited(path: &Path, max_bytes: u64) -> Result<Vec<u8>> {
    let io = |source| AdapterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let too_large = |size: u64| {
        invalid(
            path,
            format!(
                "the file is {size} bytes, over the {max_bytes}-byte limit for adapters; use a \
                 smaller adapter (lower r or fewer target modules) or raise the limit"
            ),
        )
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    if size > max_bytes {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    // The file may grow between the size check and the read; never read past the limit.
    file.take(max_bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Replaces `dir/name` with `bytes` so that a crash or a concurrent reader never sees a partial
/// file: write a temporary file beside it, flush it to disk, rename it over the old one, and
/// flush the directory so that the rename itself survives a crash.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let final_path = dir.join(name);
    // Dropping it on an error path deletes it.
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|source| AdapterError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
    let written = tmp.write_all(bytes).and_then(|()| tmp.as_file().sync_all());
    if let Err(source) = written {
        return Err(AdapterError::Io {
            path: tmp.path().to_path_buf(),
            source,
        });
    }
    tmp.persist(&final_path).map_err(|e| AdapterError::Io {
        path: final_path,
        source: e.error,
    })?;
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> Result<()> {
    let io = |source| AdapterError::Io {
        path: dir.to_path_buf(),
        source,
    };
    File::open(dir).map_err(io)?.sync_all().map_err(io)
}

/// Other systems cannot open a directory to flush it; the rename is as durable as they allow.
#[cfg(not(unix))]
fn sync_dir(_dir: &Path) -> Result<()> {
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // A test that hits an error should fail loudly, which unwrap does.
mod tests {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use super::*;

    /// A tiny llama: q and o map 16 → 16, k and v 16 → 8, gate and up 16 → 24, down 24 → 16.
    const DIMS: ModelDims = ModelDims {
        n_layer: 2,
        hidden: 16,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 4,
        ffn: 24,
        qk_rows: crate::QkRowOrder::GgufInterleaved,
    };

    /// An adapter with every value distinct and B non-zero, so that any mix-up shows.
    fn adapter(targets: &[TargetModule], use_rslora: bool) -> LoraAdapter {
        let config = LoraConfig {
            rank: 4,
            alpha: 8.0,
            targets: targets.to_vec(),
            use_rslora,
            layers: None,
        };
        let mut adapter = LoraAdapter::new_initialized(config, DIMS, 7).unwrap();
        for (i, b) in adapter
            .layers
            .values_mut()
            .flat_map(|l| l.b.iter_mut())
            .enumerate()
        {
            *b = (i as f32 * 0.37).sin() * 1e-3;
        }
        adapter
    }

    fn saved(adapter: &LoraAdapter) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        save(adapter, dir.path(), "test/tiny-llama").unwrap();
        dir
    }

    fn read_config(dir: &Path) -> serde_json::Map<String, Value> {
        serde_json::from_slice(&std::fs::read(dir.join(CONFIG_FILE)).unwrap()).unwrap()
    }

    /// Saves a q/v adapter, sets one config field, and loads it back.
    fn load_with_config_field(field: &str, value: Value) -> Result<LoraAdapter> {
        let dir = saved(&adapter(&[TargetModule::Q, TargetModule::V], false));
        let mut config = read_config(dir.path());
        config.insert(field.to_string(), value);
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        load(dir.path(), &DIMS)
    }

    /// The adapter's tensors by key, as (shape, values) in `order`, for tests to alter and
    /// rewrite.
    fn tensors_in(
        adapter: &LoraAdapter,
        order: QkRowOrder,
    ) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        let mut tensors = BTreeMap::new();
        for (&(layer, module), l) in &adapter.layers {
            tensors.insert(
                tensor_key(layer, module, Matrix::A),
                (vec![l.rank, l.in_dim], l.a.clone()),
            );
            let b = qk_rows::reorder_rows(&l.b, l.rank, module, &DIMS, DIMS.qk_rows, order);
            tensors.insert(
                tensor_key(layer, module, Matrix::B),
                (vec![l.out_dim, l.rank], b),
            );
        }
        tensors
    }

    /// The adapter's tensors as PEFT writes them.
    fn tensors_of(adapter: &LoraAdapter) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
        tensors_in(adapter, QkRowOrder::HuggingFace)
    }

    fn encode(dtype: Dtype, values: &[f32]) -> Vec<u8> {
        match dtype {
            Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Dtype::F16 => values
                .iter()
                .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::BF16 => values
                .iter()
                .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
                .collect(),
            Dtype::F64 => values
                .iter()
                .flat_map(|&v| f64::from(v).to_le_bytes())
                .collect(),
            other => panic!("no encoder for {other}"),
        }
    }

    fn write_tensors(dir: &Path, dtype: Dtype, tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>) {
        write_tensors_with_metadata(dir, dtype, tensors, None);
    }

    fn write_tensors_with_metadata(
        dir: &Path,
        dtype: Dtype,
        tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        metadata: Option<HashMap<String, String>>,
    ) {
        let data: Vec<(&String, Vec<usize>, Vec<u8>)> = tensors
            .iter()
            .map(|(k, (shape, values))| (k, shape.clone(), encode(dtype, values)))
            .collect();
        let views = data
            .iter()
            .map(|(k, shape, bytes)| (*k, TensorView::new(dtype, shape.clone(), bytes).unwrap()));
        let bytes = safetensors::serialize(views, metadata).unwrap();
        std::fs::write(dir.join(WEIGHTS_FILE), bytes).unwrap();
    }

    /// Saves `adapter`, replaces its tensors by `tensors` in `dtype`, and loads the directory.
    fn load_with_tensors(
        adapter: &LoraAdapter,
        dtype: Dtype,
        tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    ) -> Result<LoraAdapter> {
        let dir = saved(adapter);
        write_tensors(dir.path(), dtype, tensors);
        load(dir.path(), &DIMS)
    }

    fn unsupported_feature(result: Result<LoraAdapter>) -> (String, String) {
        match result {
            Err(AdapterError::UnsupportedFeature { feature, hint, .. }) => (feature, hint),
            other => panic!("expected UnsupportedFeature, got {other:?}"),
        }
    }

    fn invalid_file(result: Result<LoraAdapter>) -> (PathBuf, String) {
        match result {
            Err(AdapterError::InvalidFile { path, reason }) => (path, reason),
            other => panic!("expected InvalidFile, got {other:?}"),
        }
    }

    #[test]
    fn save_then_load_is_bit_exact() {
        // Targets out of PEFT's canonical order, to check the order survives too.
        let original = adapter(
            &[TargetModule::V, TargetModule::Q, TargetModule::Down],
            false,
        );
        let dir = saved(&original);
        let loaded = load(dir.path(), &DIMS).unwrap();
        assert_eq!(loaded.config, original.config);
        assert_eq!(loaded.dims, original.dims);
        let bits =
            |a: &LoraAdapter| -> Vec<u32> { a.params().flatten().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&loaded), bits(&original));
        assert_eq!(loaded, original);
    }

    /// The file's `lora_B` of `module` in layer 0, and its declared row order.
    fn stored_b(dir: &Path, module: TargetModule) -> (Vec<f32>, Option<QkRowOrder>) {
        let bytes = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let key = tensor_key(0, module, Matrix::B);
        let values = to_f32(dir, &key, &file.tensor(&key).unwrap()).unwrap();
        (values, stored_row_order(dir).unwrap())
    }

    #[test]
    fn saved_q_and_k_rows_are_in_hugging_face_order() {
        let original = adapter(&[TargetModule::Q, TargetModule::K, TargetModule::V], false);
        let dir = saved(&original);
        for module in [TargetModule::Q, TargetModule::K, TargetModule::V] {
            let engine_b = &original.layers[&(0, module)].b;
            let (file_b, order) = stored_b(dir.path(), module);
            assert_eq!(order, Some(QkRowOrder::HuggingFace));
            let hf_b = qk_rows::reorder_rows(
                engine_b,
                4,
                module,
                &DIMS,
                QkRowOrder::GgufInterleaved,
                QkRowOrder::HuggingFace,
            );
            assert_eq!(file_b, hf_b, "{module}");
            assert_eq!(
                file_b == *engine_b,
                module == TargetModule::V,
                "only q and k are permuted ({module})"
            );
        }
    }

    #[test]
    fn a_peft_file_without_a_row_order_is_in_hugging_face_order() {
        let original = adapter(&[TargetModule::Q, TargetModule::K], false);
        let loaded = load_with_tensors(&original, Dtype::F32, &tensors_of(&original)).unwrap();
        assert_eq!(loaded, original);
    }

    #[test]
    fn an_engine_order_folder_converts_to_peft_order_once() {
        // What earlier versions of this server published: engine-order rows, no row order.
        let original = adapter(&[TargetModule::Q, TargetModule::V], false);
        let dir = saved(&original);
        write_tensors(
            dir.path(),
            Dtype::F32,
            &tensors_in(&original, QkRowOrder::GgufInterleaved),
        );
        assert_eq!(stored_row_order(dir.path()).unwrap(), None);
        assert_ne!(
            load(dir.path(), &DIMS).unwrap(),
            original,
            "read as PEFT's order"
        );

        convert_engine_order_folder(dir.path(), &DIMS, u64::MAX).unwrap();
        assert_eq!(
            stored_row_order(dir.path()).unwrap(),
            Some(QkRowOrder::HuggingFace)
        );
        assert_eq!(load(dir.path(), &DIMS).unwrap(), original);
        let again = tempfile::tempdir().unwrap();
        save(&original, again.path(), "test/tiny-llama").unwrap();
        assert_eq!(
            std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap(),
            std::fs::read(again.path().join(WEIGHTS_FILE)).unwrap(),
            "the converted file is what a save writes now"
        );
    }

    #[test]
    fn an_unknown_row_order_is_refused() {
        let original = adapter(&[TargetModule::Q], false);
        let dir = saved(&original);
        let metadata = HashMap::from([(ROW_ORDER_KEY.to_string(), "neox".to_string())]);
        write_tensors_with_metadata(
            dir.path(),
            Dtype::F32,
            &tensors_of(&original),
            Some(metadata),
        );
        let (_, reason) = invalid_file(load(dir.path(), &DIMS));
        assert!(
            reason.contains("mezo.qk_row_order") && reason.contains("hugging_face"),
            "{reason}"
        );
        assert!(stored_row_order(dir.path()).is_err());
    }

    #[test]
    fn save_replaces_files_and_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("nested/adapter");
        save(&adapter(&[TargetModule::Q], false), &target, "m").unwrap();
        let second = adapter(&[TargetModule::K, TargetModule::O], true);
        save(&second, &target, "m").unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, [CONFIG_FILE, WEIGHTS_FILE]);
        assert_eq!(load(&target, &DIMS).unwrap(), second);
    }

    #[test]
    fn config_has_peft_field_names_and_values() {
        let dir = saved(&adapter(&[TargetModule::Q, TargetModule::V], false));
        let config = read_config(dir.path());
        let expected = serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": 4,
            "lora_alpha": 8.0,
            "target_modules": ["q_proj", "v_proj"],
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": false,
            "use_dora": false,
            "modules_to_save": null,
            "fan_in_fan_out": false,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "base_model_name_or_path": "test/tiny-llama",
            "inference_mode": true,
        });
        assert_eq!(Value::Object(config), expected);
    }

    #[test]
    fn tensors_have_peft_keys_and_shapes() {
        let dir = saved(&adapter(&[TargetModule::Q, TargetModule::Down], false));
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.len(), 2 * 2 * 2);
        let a = file
            .tensor("base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight")
            .unwrap();
        assert_eq!((a.dtype(), a.shape()), (Dtype::F32, &[4, 16][..]));
        let b = file
            .tensor("base_model.model.model.layers.0.mlp.down_proj.lora_B.weight")
            .unwrap();
        assert_eq!((b.dtype(), b.shape()), (Dtype::F32, &[16, 4][..]));
    }

    #[test]
    fn rslora_scales_by_the_root_of_the_rank() {
        let dir = saved(&adapter(&[TargetModule::Q], true));
        assert_eq!(read_config(dir.path())["use_rslora"], Value::Bool(true));
        let loaded = load(dir.path(), &DIMS).unwrap();
        assert!(loaded.config.use_rslora);
        assert_eq!(loaded.config.scale(), 8.0 / 2.0);

        let plain = load_with_config_field("use_rslora", Value::Bool(false)).unwrap();
        assert_eq!(plain.config.scale(), 8.0 / 4.0);
    }

    #[test]
    fn unsupported_config_features_are_refused() {
        let cases = [
            ("peft_type", serde_json::json!("IA3"), "peft_type"),
            ("task_type", serde_json::json!("SEQ_CLS"), "task_type"),
            ("use_dora", serde_json::json!(true), "use_dora"),
            (
                "modules_to_save",
                serde_json::json!(["lm_head"]),
                "modules_to_save",
            ),
            (
                "rank_pattern",
                serde_json::json!({"q_proj": 16}),
                "rank_pattern",
            ),
            (
                "alpha_pattern",
                serde_json::json!({"v_proj": 32}),
                "alpha_pattern",
            ),
            ("bias", serde_json::json!("lora_only"), "bias"),
            ("fan_in_fan_out", serde_json::json!(true), "fan_in_fan_out"),
            ("layers_pattern", serde_json::json!("h"), "layers_pattern"),
            (
                "init_lora_weights",
                serde_json::json!("pissa"),
                "init_lora_weights",
            ),
            (
                "target_modules",
                serde_json::json!(["q_proj", "embed_tokens"]),
                "embed_tokens",
            ),
            ("target_modules", serde_json::json!(["lm_head"]), "lm_head"),
            (
                "target_modules",
                serde_json::json!(".*\\.(q|v)_proj"),
                "regular expression",
            ),
        ];
        for (field, value, feature) in cases {
            let (got, hint) = unsupported_feature(load_with_config_field(field, value.clone()));
            assert!(
                got.contains(feature),
                "{field} = {value}: feature `{got}` should mention `{feature}`"
            );
            assert!(!hint.is_empty());
        }
    }

    #[test]
    fn short_module_names_in_files_get_a_hint() {
        let (feature, hint) = unsupported_feature(load_with_config_field(
            "target_modules",
            serde_json::json!(["q", "v_proj"]),
        ));
        assert!(feature.contains("\"q\""), "{feature}");
        assert!(hint.contains("q_proj"), "{hint}");
    }

    #[test]
    fn default_valued_features_are_accepted() {
        for (field, value) in [
            ("modules_to_save", serde_json::json!([])),
            ("modules_to_save", Value::Null),
            ("rank_pattern", serde_json::json!({})),
            ("alpha_pattern", serde_json::json!({})),
            ("layers_to_transform", Value::Null),
            ("layers_to_transform", serde_json::json!([1, 0])),
            ("layers_pattern", serde_json::json!("layers")),
            ("use_dora", serde_json::json!(false)),
            ("bias", serde_json::json!("none")),
            ("init_lora_weights", serde_json::json!("gaussian")),
            ("init_lora_weights", serde_json::json!(false)),
            (
                "target_modules",
                serde_json::json!(["v_proj", "q_proj", "q_proj"]),
            ),
            ("lora_alpha", serde_json::json!(8)),
            ("task_type", Value::Null),
        ] {
            let loaded = load_with_config_field(field, value.clone());
            assert!(loaded.is_ok(), "{field} = {value}: {loaded:?}");
        }
    }

    #[test]
    fn target_modules_as_a_plain_string_is_accepted() {
        let original = adapter(&[TargetModule::Q], false);
        let dir = saved(&original);
        let mut config = read_config(dir.path());
        config.insert("target_modules".into(), serde_json::json!("q_proj"));
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        assert_eq!(load(dir.path(), &DIMS).unwrap(), original);
    }

    #[test]
    fn all_linear_targets_every_module() {
        let original = adapter(&TargetModule::ALL, false);
        let dir = saved(&original);
        let mut config = read_config(dir.path());
        config.insert("target_modules".into(), serde_json::json!("all-linear"));
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        assert_eq!(load(dir.path(), &DIMS).unwrap(), original);
    }

    /// A q/v adapter of layer 1 only (the tiny model has layers 0 and 1).
    fn top_layer_adapter() -> LoraAdapter {
        let mut adapter = adapter(&[TargetModule::Q, TargetModule::V], false);
        adapter.config.layers = Some(vec![1]);
        adapter.layers.retain(|&(layer, _), _| layer == 1);
        adapter
    }

    #[test]
    fn a_layer_subset_saves_as_layers_to_transform_and_loads_back() {
        let original = top_layer_adapter();
        let dir = saved(&original);
        assert_eq!(
            read_config(dir.path())["layers_to_transform"],
            serde_json::json!([1])
        );
        assert_eq!(read_config(dir.path())["layers_pattern"], Value::Null);
        let names: Vec<String> = tensors_of(&original).into_keys().collect();
        assert!(names.iter().all(|n| n.contains("layers.1.")), "{names:?}");
        assert_eq!(load(dir.path(), &DIMS).unwrap(), original);

        // PEFT also accepts a single index for one layer.
        let mut config = read_config(dir.path());
        config.insert("layers_to_transform".into(), serde_json::json!(1));
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            serde_json::to_vec(&config).unwrap(),
        )
        .unwrap();
        assert_eq!(load(dir.path(), &DIMS).unwrap(), original);
    }

    #[test]
    fn tensors_of_layers_outside_layers_to_transform_are_refused() {
        let subset = top_layer_adapter();
        let every_layer = tensors_of(&adapter(&[TargetModule::Q, TargetModule::V], false));
        let (_, reason) = invalid_file(load_with_tensors(&subset, Dtype::F32, &every_layer));
        assert!(
            reason.contains("layer 0, which layers_to_transform does not list"),
            "{reason}"
        );
    }

    #[test]
    fn unusable_layer_lists_are_refused() {
        for (value, needle) in [
            (serde_json::json!([]), "empty list"),
            (serde_json::json!([0, -1]), "found -1"),
            (serde_json::json!("0"), "found \"0\""),
            (serde_json::json!([2]), "layer 2 does not exist"),
        ] {
            let (_, reason) =
                invalid_file(load_with_config_field("layers_to_transform", value.clone()));
            assert!(reason.contains(needle), "{value}: {reason}");
        }
    }

    #[test]
    fn invalid_hyperparameters_are_refused() {
        for (field, value, needle) in [
            ("r", serde_json::json!(0), "rank"),
            ("r", serde_json::json!(-1), "invalid value"),
            ("lora_alpha", serde_json::json!(-2.0), "lora_alpha"),
            ("target_modules", serde_json::json!([]), "target_modules"),
            ("target_modules", Value::Null, "target_modules"),
            ("target_modules", serde_json::json!([1]), "target_modules"),
        ] {
            let (_, reason) = invalid_file(load_with_config_field(field, value.clone()));
            assert!(reason.contains(needle), "{field} = {value}: {reason}");
        }
    }

    #[test]
    fn malformed_json_reports_serdes_message() {
        let dir = saved(&adapter(&[TargetModule::Q], false));
        std::fs::write(dir.path().join(CONFIG_FILE), "{\"peft_type\": \"LORA\",").unwrap();
        let (path, reason) = invalid_file(load(dir.path(), &DIMS));
        assert_eq!(path, dir.path().join(CONFIG_FILE));
        assert!(reason.contains("EOF while parsing"), "{reason}");
    }

    #[test]
    fn missing_directory_and_files_are_io_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let absent = dir.path().join("absent");
        match load(&absent, &DIMS) {
            Err(AdapterError::Io { path, source }) => {
                assert_eq!(path, absent.join(CONFIG_FILE));
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("expected Io, got {other:?}"),
        }

        let saved = saved(&adapter(&[TargetModule::Q], false));
        std::fs::remove_file(saved.path().join(WEIGHTS_FILE)).unwrap();
        match load(saved.path(), &DIMS) {
            Err(AdapterError::Io { path, .. }) => assert_eq!(path, saved.path().join(WEIGHTS_FILE)),
            other => panic!("expected Io, got {other:?}"),
        }

        std::fs::write(saved.path().join(PICKLE_WEIGHTS_FILE), b"pickle").unwrap();
        let (feature, hint) = unsupported_feature(load(saved.path(), &DIMS));
        assert!(feature.contains(PICKLE_WEIGHTS_FILE), "{feature}");
        assert!(hint.contains("safe_serialization"), "{hint}");
    }

    #[test]
    fn shape_mismatch_names_the_key() {
        let original = adapter(&[TargetModule::Q, TargetModule::V], false);
        let mut tensors = tensors_of(&original);
        let key = tensor_key(1, TargetModule::V, Matrix::B);
        tensors.insert(key.clone(), (vec![16, 4], vec![0.0; 64]));
        let (_, reason) = invalid_file(load_with_tensors(&original, Dtype::F32, &tensors));
        assert!(reason.contains(&key), "{reason}");
        assert!(
            reason.contains("[16, 4]") && reason.contains("[8, 4]"),
            "{reason}"
        );
    }

    #[test]
    fn missing_tensor_names_the_key() {
        let original = adapter(&[TargetModule::Q, TargetModule::V], false);
        let mut tensors = tensors_of(&original);
        let key = tensor_key(1, TargetModule::Q, Matrix::A);
        tensors.remove(&key);
        let (_, reason) = invalid_file(load_with_tensors(&original, Dtype::F32, &tensors));
        assert!(reason.contains(&key), "{reason}");
        assert!(reason.contains("1 of the 8"), "{reason}");
    }

    #[test]
    fn extra_tensors_are_refused_by_name() {
        let original = adapter(&[TargetModule::Q], false);
        let extra = [
            (
                tensor_key(0, TargetModule::K, Matrix::A),
                "unexpected tensor",
            ),
            (tensor_key(2, TargetModule::Q, Matrix::A), "layer 2"),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight".into(),
                "adapter name",
            ),
            (
                "base_model.model.model.embed_tokens.lora_embedding_A".into(),
                "unexpected tensor",
            ),
        ];
        for (key, needle) in extra {
            let mut tensors = tensors_of(&original);
            tensors.insert(key.clone(), (vec![4, 16], vec![0.0; 64]));
            let (_, reason) = invalid_file(load_with_tensors(&original, Dtype::F32, &tensors));
            assert!(reason.contains(&key), "{reason}");
            assert!(reason.contains(needle), "{reason}");
        }
    }

    #[test]
    fn half_precision_tensors_are_widened() {
        // Multiples of 2⁻¹⁰ below 1 are exact in f16, and with 7 significant bits in bf16 too.
        let mut original = adapter(&[TargetModule::Q, TargetModule::Up], false);
        for (i, v) in original.params_mut().flatten().enumerate() {
            *v = ((i % 97) as f32 - 48.0) / 1024.0;
        }
        for dtype in [Dtype::F16, Dtype::BF16] {
            let loaded = load_with_tensors(&original, dtype, &tensors_of(&original)).unwrap();
            assert_eq!(loaded, original, "{dtype}");
        }
    }

    #[test]
    fn other_dtypes_and_non_finite_values_are_refused() {
        let original = adapter(&[TargetModule::Q], false);
        let (_, reason) = invalid_file(load_with_tensors(
            &original,
            Dtype::F64,
            &tensors_of(&original),
        ));
        assert!(reason.contains("F64"), "{reason}");

        let mut tensors = tensors_of(&original);
        let key = tensor_key(0, TargetModule::Q, Matrix::B);
        tensors.get_mut(&key).unwrap().1[3] = f32::NAN;
        let (_, reason) = invalid_file(load_with_tensors(&original, Dtype::F32, &tensors));
        assert!(reason.contains(&key) && reason.contains("NaN"), "{reason}");
    }

    #[test]
    fn corrupt_safetensors_is_invalid_file() {
        let dir = saved(&adapter(&[TargetModule::Q], false));
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"not safetensors").unwrap();
        let (path, reason) = invalid_file(load(dir.path(), &DIMS));
        assert_eq!(path, dir.path().join(WEIGHTS_FILE));
        assert!(reason.contains("safetensors"), "{reason}");
    }

    #[test]
    fn size_limit_is_checked_before_reading() {
        let original = adapter(&[TargetModule::Q], false);
        let dir = saved(&original);
        let size = std::fs::metadata(dir.path().join(WEIGHTS_FILE))
            .unwrap()
            .len();
        assert_eq!(load_limited(dir.path(), &DIMS, size).unwrap(), original);
        let (path, reason) = invalid_file(load_limited(dir.path(), &DIMS, size - 1));
        assert_eq!(path, dir.path().join(WEIGHTS_FILE));
        assert!(
            reason.contains(&format!("{size} bytes")) && reason.contains(&format!("{}", size - 1)),
            "{reason}"
        );
    }

    #[test]
    fn inconsistent_adapters_are_not_saved() {
        let mut broken = adapter(&[TargetModule::Q], false);
        broken.layers.values_mut().next().unwrap().b.pop();
        let dir = tempfile::tempdir().unwrap();
        match save(&broken, dir.path(), "m") {
            Err(AdapterError::InvalidConfig(reason)) => assert!(reason.contains("layer 0 q_proj")),
            other => panic!("expected InvalidConfig, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
