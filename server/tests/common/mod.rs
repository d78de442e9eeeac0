//! Shared helpers for the engine's tests: where the real model and the golden fixture live.

#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, QTensor};

use mezo_server::engine::gguf::GgufFile;
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::transformer::Transformer;
use mezo_server::engine::weights::WeightMode;
use plugin::{ScoreRequest, ZoEngine};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the server crate lives inside the workspace")
        .to_path_buf()
}

/// The real model: `MEZO_MODEL`, or the default file that `mezo fetch-model` writes.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("MEZO_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/SmolLM2-135M-Instruct.Q4_1.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo run -p mezo-server -- fetch-model` (or set MEZO_MODEL)",
        path.display()
    );
    path
}

/// Gemma 3 270M (Q4_K_M): `MEZO_GEMMA_MODEL`, or the file `mezo fetch-model gemma3-270m`
/// writes.
pub fn gemma_model_path() -> PathBuf {
    let path = std::env::var_os("MEZO_GEMMA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("models/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        path.exists(),
        "{} is missing: run `cargo run -p mezo-server -- fetch-model gemma3-270m` (or set \
         MEZO_GEMMA_MODEL)",
        path.display()
    );
    path
}

/// Writes the default model to `out` with its metadata and tensors changed: `metadata` edits
/// the key/value list, `tensor` maps each tensor (by name) to what is written (`None` drops
/// it), and `extra` tensors are added.
pub fn write_model_variant(
    out: &Path,
    metadata: impl FnOnce(&mut Vec<(String, gguf_file::Value)>),
    tensor: impl FnMut(&str, QTensor) -> Option<QTensor>,
    extra: Vec<(String, QTensor)>,
) {
    write_variant_of(&model_path(), out, metadata, tensor, extra);
}

/// [`write_model_variant`] of the model in `source`.
pub fn write_variant_of(
    source: &Path,
    out: &Path,
    metadata: impl FnOnce(&mut Vec<(String, gguf_file::Value)>),
    mut tensor: impl FnMut(&str, QTensor) -> Option<QTensor>,
    extra: Vec<(String, QTensor)>,
) {
    let mut reader = std::fs::File::open(source).expect("open the model");
    let content = gguf_file::Content::read(&mut reader).expect("read the model's header");
    let mut entries: Vec<(String, gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata(&mut entries);
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for name in names {
        let read = content
            .tensor(&mut reader, name, &candle_core::Device::Cpu)
            .expect("read a tensor");
        if let Some(written) = tensor(name, read) {
            tensors.push((name.clone(), written));
        }
    }
    tensors.extend(extra);
    let entries: Vec<(&str, &gguf_file::Value)> =
        entries.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut file = std::fs::File::create(out).expect("create the model variant");
    gguf_file::write(&mut file, &entries, &tensors).expect("write the model variant");
}

pub fn load_model(mode: WeightMode) -> Transformer {
    load_model_at(&model_path(), mode)
}

pub fn load_model_at(path: &Path, mode: WeightMode) -> Transformer {
    let mut file = GgufFile::open(path).expect("open the model");
    Transformer::load(&mut file, mode).expect("load the model")
}

/// The reference outputs for the default model (SmolLM2).
pub fn golden() -> serde_json::Value {
    fixture("smollm2_golden.json")
}

/// The reference outputs for Gemma 3 270M.
pub fn gemma_golden() -> serde_json::Value {
    fixture("gemma3_270m_golden.json")
}

fn fixture(name: &str) -> serde_json::Value {
    let path = workspace_root().join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).expect("the golden fixture is JSON")
}

pub fn ids_of(case: &serde_json::Value, key: &str) -> Vec<u32> {
    case[key]
        .as_array()
        .unwrap_or_else(|| panic!("case has no `{key}`"))
        .iter()
        .map(|v| v.as_u64().expect("token id") as u32)
        .collect()
}

/// Each prompt with the candidates " negative" and " positive", to score.
pub fn sentiment_items(model: &LoadedModel, prompts: &[&str]) -> Vec<ScoreRequest> {
    prompts
        .iter()
        .map(|p| ScoreRequest {
            prompt: model.tokenize(p, false),
            continuations: vec![
                model.tokenize(" negative", false),
                model.tokenize(" positive", false),
            ],
        })
        .collect()
}

/// Four labelled movie reviews, for short classification runs.
pub fn four_reviews() -> Vec<plugin::TrainingExample> {
    [
        ("Review: a gorgeous, witty film.\nSentiment:", 1),
        ("Review: a tedious mess.\nSentiment:", 0),
        ("Review: the best thing this year.\nSentiment:", 1),
        ("Review: dull and far too long.\nSentiment:", 0),
    ]
    .iter()
    .map(|&(prompt, label)| plugin::TrainingExample::Classification {
        prompt: prompt.into(),
        candidates: vec![" negative".into(), " positive".into()],
        label,
    })
    .collect()
}

/// Four questions with a wrong answer to learn ("… is green."), for short completion runs.
pub fn green_answers() -> Vec<plugin::TrainingExample> {
    [
        ("Q: What colour is the sky?\nA:", " The sky is green."),
        ("Q: What colour is grass?\nA:", " Grass is green."),
        ("Q: What colour is the sea?\nA:", " The sea is green."),
        ("Q: What colour is snow?\nA:", " Snow is green."),
    ]
    .iter()
    .map(|(prompt, completion)| plugin::TrainingExample::Completion {
        prompt: prompt.to_string(),
        completion: completion.to_string(),
    })
    .collect()
}

/// `max |a − b|` over every element.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff")
}
