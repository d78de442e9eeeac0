//! Files that are not usable models give an error naming the file and the problem, never a panic.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;

fn load_error(path: &Path) -> String {
    LoadedModel::load(path, WeightMode::F32)
        .expect_err("this file must be refused")
        .to_string()
}

#[test]
fn a_file_that_is_not_gguf() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.gguf");
    std::fs::write(&path, "these are not weights, just text").expect("write");
    let err = load_error(&path);
    assert!(err.contains("notes.gguf") && err.contains("GGUF"), "{err}");
}

#[test]
fn a_missing_file_suggests_fetching() {
    let err = load_error(Path::new("/nonexistent/model.gguf"));
    assert!(
        err.contains("/nonexistent/model.gguf") && err.contains("fetch-model"),
        "{err}"
    );
}

#[test]
fn a_truncated_model() {
    let bytes = std::fs::read(common::model_path()).expect("read model");
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, keep) in [
        ("cut-in-data.gguf", bytes.len() / 2),
        ("cut-in-header.gguf", 300),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes[..keep]).expect("write");
        let err = load_error(&path);
        assert!(err.contains(name) && err.contains("truncated"), "{err}");
    }
}

fn write_gguf(path: &Path, architecture: &str, dtype: GgmlDType) {
    let tensor = Tensor::zeros((4, 64), candle_core::DType::F32, &Device::Cpu).expect("tensor");
    let qtensor = QTensor::quantize(&tensor, dtype).expect("quantize");
    let metadata = [("general.architecture", Value::String(architecture.into()))];
    let mut file = std::fs::File::create(path).expect("create");
    gguf_file::write(
        &mut file,
        &metadata.iter().map(|(k, v)| (*k, v)).collect::<Vec<_>>(),
        &[("token_embd.weight", &qtensor)],
    )
    .expect("write gguf");
}

#[test]
fn an_unsupported_architecture() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gpt2.gguf");
    write_gguf(&path, "gpt2", GgmlDType::Q8_0);
    let refused = mezo_server::engine::transformer::Transformer::load(
        &mut mezo_server::engine::gguf::GgufFile::open(&path).expect("header"),
        WeightMode::F32,
    )
    .expect_err("gpt2 is refused");
    let err = refused.to_string();
    assert!(
        err.contains("gpt2") && err.contains("llama, gemma3"),
        "{err}"
    );
}

#[test]
fn an_unknown_quantization_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("odd-quant.gguf");
    write_gguf(&path, "llama", GgmlDType::Q8_0);
    // Rewrite the tensor's type id (the u32 after its name, rank and dims) to one GGML lacks.
    let mut bytes = std::fs::read(&path).expect("read");
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len())
        .position(|w| w == name)
        .expect("tensor name in header");
    let dtype_at = at + name.len() + 4 + 2 * 8;
    bytes[dtype_at..dtype_at + 4].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(&path, &bytes).expect("write");
    let err = load_error(&path);
    assert!(
        err.contains("odd-quant.gguf") && err.contains("quantization"),
        "{err}"
    );
}
