//! `adapter_config.json`: PEFT's `LoraConfig` as written by [`super::save`] and as read, with
//! every PEFT feature this engine does not compute (DoRA, per-module ranks, trained biases,
//! full copies of other modules, …) refused by name.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{invalid, unsupported};
use crate::{AdapterError, LoraConfig, Result, TargetModule};

/// `adapter_config.json` for an adapter of `config` on `base_model_name_or_path`.
pub(super) fn config_json(config: &LoraConfig, base_model_name_or_path: &str) -> Result<String> {
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
    serde_json::to_string_pretty(&config_json)
        .map_err(|e| AdapterError::InvalidConfig(format!("cannot serialise the config: {e}")))
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

/// The supported target modules as PEFT names them, for error messages.
pub(super) fn supported_targets() -> String {
    TargetModule::ALL.map(TargetModule::peft_name).join(", ")
}

/// Parses `adapter_config.json` into a [`LoraConfig`], refusing anything it cannot express.
pub(super) fn parse_config(path: &Path, text: &[u8]) -> Result<LoraConfig> {
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
pub(super) fn parse_layers(path: &Path, value: Option<&Value>) -> Result<Option<Vec<usize>>> {
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
pub(super) fn parse_targets(path: &Path, value: &Value) -> Result<Vec<TargetModule>> {
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
pub(super) fn peft_target(name: &str) -> Option<TargetModule> {
    TargetModule::ALL
        .into_iter()
        .find(|m| m.peft_name() == name)
}
