//! Rotary scaling read from the file, as llama.cpp applies it: Llama 3.1's per-frequency factors
//! (`rope_freqs.weight`) divide each angle, linear scaling (`llama.rope.scaling.*`) scales the
//! positions, and a scaling this engine does not implement is refused, never ignored. Factors
//! of 2 everywhere and linear scaling by 2 halve the same angles, so they give the same bits.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use mezo_server::engine::gguf::GgufFile;
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;
use plugin::{LogProbs, ZoEngine};

/// Rotary frequencies per head of the default model: half its head size.
fn frequencies() -> usize {
    let file = GgufFile::open(&common::model_path()).expect("open the model");
    let meta = file.metadata();
    let hidden = meta.usize("llama.embedding_length").expect("width");
    let heads = meta.usize("llama.attention.head_count").expect("heads");
    hidden / heads / 2
}

/// The default model with `metadata` added and, when given, `rope_freqs.weight` set to `factor`
/// for every frequency.
fn variant(dir: &Path, name: &str, metadata: Vec<(&str, Value)>, factor: Option<f32>) -> PathBuf {
    let path = dir.join(name);
    let half = frequencies();
    let extra = factor
        .map(|f| {
            let factors = Tensor::full(f, half, &Device::Cpu).expect("factors");
            let factors = QTensor::quantize(&factors, GgmlDType::F32).expect("an f32 tensor");
            vec![("rope_freqs.weight".to_string(), factors)]
        })
        .unwrap_or_default();
    common::write_model_variant(
        &path,
        |entries| entries.extend(metadata.into_iter().map(|(k, v)| (k.to_string(), v))),
        |_, tensor| Some(tensor),
        extra,
    );
    path
}

fn scores(model: &LoadedModel) -> LogProbs {
    let fresh = adapters::LoraAdapter::new_initialized(
        adapters::LoraConfig::default(),
        model.transformer.config.dims(),
        0,
    )
    .expect("a fresh adapter");
    let items = common::sentiment_items(
        model,
        &["Review: a tender, funny and beautifully acted film that I will remember.\nSentiment:"],
    );
    model.score(&[&fresh], &items).expect("score")
}

#[test]
fn rope_factors_and_linear_scaling_are_applied_as_llama_cpp_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let load = |path: &Path| LoadedModel::load(path, WeightMode::Quantized).expect("load");
    let original = scores(&load(&common::model_path()));

    let ones = variant(dir.path(), "ones.gguf", Vec::new(), Some(1.0));
    assert_eq!(
        scores(&load(&ones)),
        original,
        "factors of 1 change nothing"
    );

    let halved_by_factors = scores(&load(&variant(
        dir.path(),
        "factors.gguf",
        Vec::new(),
        Some(2.0),
    )));
    let linear = vec![
        ("llama.rope.scaling.type", Value::String("linear".into())),
        ("llama.rope.scaling.factor", Value::F32(2.0)),
    ];
    let halved_linearly = scores(&load(&variant(dir.path(), "linear.gguf", linear, None)));
    assert_eq!(halved_by_factors, halved_linearly);
    assert_ne!(
        halved_by_factors, original,
        "halved angles must change the outputs"
    );

    let yarn = vec![
        ("llama.rope.scaling.type", Value::String("yarn".into())),
        ("llama.rope.scaling.factor", Value::F32(4.0)),
    ];
    let path = variant(dir.path(), "yarn.gguf", yarn, None);
    let err = LoadedModel::load(&path, WeightMode::Quantized).expect_err("yarn is refused");
    assert!(err.to_string().contains("yarn"), "{err}");
}
