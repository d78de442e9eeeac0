//! The PEFT folder format against files written by hand and by `peft` itself: what loads, what
//! is refused and why, and that a save loads back bit for bit.

// A test that hits an error should fail loudly, which unwrap does.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::PathBuf;

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

use super::tensors::{tensor_key, to_f32, Matrix};
use super::*;
use crate::qk_rows;
use crate::{LoraConfig, TargetModule};

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

#[test]
fn files_in_memory_are_the_bytes_save_writes() {
    let original = adapter(&[TargetModule::Q, TargetModule::V], false);
    let dir = saved(&original);
    let files = PeftFiles::of(&original, "test/tiny-llama").unwrap();
    assert_eq!(
        files.weights,
        std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap()
    );
    assert_eq!(
        files.config_json,
        std::fs::read_to_string(dir.path().join(CONFIG_FILE)).unwrap()
    );
    // Written elsewhere (another server's folder), they load as the same adapter.
    let elsewhere = tempfile::tempdir().unwrap();
    files.write(elsewhere.path()).unwrap();
    assert_eq!(load(elsewhere.path(), &DIMS).unwrap(), original);
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
