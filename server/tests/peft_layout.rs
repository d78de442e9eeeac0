//! LoRA on q/k in PEFT's row order: the engine's q/k rows are llama.cpp's GGUF permutation of
//! Hugging Face's, so an adapter's `lora_B` of q/k is permuted on load and back on save
//! (`adapters::qk_rows`). These tests hold that permutation to llama.cpp's own formulation of it
//! applied to a dense delta, and hold a trained adapter's save/load round trip to bit-exact
//! scores with PEFT's layout on disk. (The fixture written by `peft` itself is checked over HTTP
//! in the workspace's `tests/peft_adapters.rs`.)

mod common;

use adapters::qk_rows::reorder_rows;
use adapters::{LoraAdapter, LoraConfig, QkRowOrder, TargetModule};
use candle_core::{Device, Tensor};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::weights::WeightMode;
use plugin::{ObjectiveKind, Trainer, TrainerConfig, ZoEngine};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py), as it writes it: reshape to
/// `[n_head, 2, d/2, in]`, swap axes 1 and 2, flatten back.
fn llama_cpp_permute(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    Tensor::from_slice(w, (n_head, 2, head_dim / 2, cols), &Device::Cpu)
        .and_then(|t| t.transpose(1, 2))
        .and_then(|t| t.contiguous())
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .expect("candle reshapes a host tensor")
}

fn matmul(a: &[f32], b: &[f32], n: usize, k: usize, m: usize) -> Vec<f32> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[i * m + j] = (0..k).map(|l| a[i * k + l] * b[l * m + j]).sum();
        }
    }
    out
}

#[test]
fn q_and_k_deltas_land_where_llama_cpp_puts_the_dense_delta() {
    // SmolLM2's shapes: q has 9 heads, k 3, of 64; hidden 576.
    let dims = adapters::ModelDims {
        n_layer: 1,
        hidden: 576,
        n_head: 9,
        n_kv_head: 3,
        head_dim: 64,
        ffn: 1536,
        qk_rows: QkRowOrder::GgufInterleaved,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let rank = 8;
    for (module, heads) in [(TargetModule::Q, 9), (TargetModule::K, 3)] {
        let (in_dim, out_dim) = module.dims(&dims);
        let w_hf = random(&mut rng, out_dim * in_dim);
        let a = random(&mut rng, rank * in_dim);
        let b_hf = random(&mut rng, out_dim * rank);
        // What the Hugging Face model with PEFT's adapter computes, converted by llama.cpp.
        let delta_hf = matmul(&b_hf, &a, out_dim, rank, in_dim);
        let merged_hf: Vec<f32> = w_hf.iter().zip(&delta_hf).map(|(w, d)| w + d).collect();
        let expected = llama_cpp_permute(&merged_hf, heads, out_dim, in_dim);
        // What the engine computes: the GGUF weight plus the adapter with B's rows permuted.
        let w_gguf = llama_cpp_permute(&w_hf, heads, out_dim, in_dim);
        let b_engine = reorder_rows(
            &b_hf,
            rank,
            module,
            &dims,
            QkRowOrder::HuggingFace,
            QkRowOrder::GgufInterleaved,
        );
        let delta_engine = matmul(&b_engine, &a, out_dim, rank, in_dim);
        for (i, (e, (w, d))) in expected
            .iter()
            .zip(w_gguf.iter().zip(&delta_engine))
            .enumerate()
        {
            assert!(
                (e - (w + d)).abs() <= 1e-5,
                "{module} element {i}: {e} vs {}",
                w + d
            );
        }
        // And llama.cpp's permutation of B itself is the engine's (the delta is linear in B).
        assert_eq!(llama_cpp_permute(&b_hf, heads, out_dim, rank), b_engine);
    }
}

#[test]
fn a_trained_q_v_adapter_saves_in_peft_order_and_reloads_bit_for_bit() {
    let model = LoadedModel::load(&common::model_path(), WeightMode::default()).expect("load");
    let dims = model.transformer.config.dims();
    assert_eq!(dims.qk_rows, QkRowOrder::GgufInterleaved);
    let initial = LoraAdapter::new_initialized(LoraConfig::default(), dims, 3).expect("adapter");
    let config = TrainerConfig {
        lr: 1e-2,
        batch_size: 4,
        max_steps: 2,
        seed: 2,
        ..TrainerConfig::default()
    };
    let objective = ObjectiveKind::Classification.build().expect("objective");
    let mut trainer = Trainer::new(
        config,
        objective,
        initial,
        common::four_reviews(),
        Vec::new(),
    )
    .expect("trainer");
    for _ in 0..2 {
        trainer.step(&model).expect("step");
    }
    let trained = trainer.adapter();
    let b_q = &trained.layers[&(0, TargetModule::Q)].b;
    assert!(b_q.iter().any(|&b| b != 0.0), "training moved q's B");

    let dir = tempfile::tempdir().expect("a temporary folder");
    adapters::peft::save(trained, dir.path(), "smollm2-135m-instruct").expect("save");
    let reloaded = adapters::peft::load(dir.path(), &dims).expect("load");
    let bits =
        |a: &LoraAdapter| -> Vec<u32> { a.params().flatten().map(|v| v.to_bits()).collect() };
    assert_eq!(bits(&reloaded), bits(trained));

    let items = common::sentiment_items(&model, &["Review: a gorgeous, witty film.\nSentiment:"]);
    let before = model.score(&[trained], &items).expect("score");
    let after = model.score(&[&reloaded], &items).expect("score");
    assert_eq!(
        before, after,
        "the reloaded adapter scores bit for bit the same"
    );

    // On disk, q's B is in Hugging Face's order: the engine's tensor under the inverse
    // permutation; v's is the engine's own.
    let bytes = std::fs::read(dir.path().join(adapters::peft::WEIGHTS_FILE)).expect("read");
    let file = SafeTensors::deserialize(&bytes).expect("safetensors");
    let stored = |module: &str| -> Vec<f32> {
        let key = format!("base_model.model.model.layers.0.self_attn.{module}.lora_B.weight");
        file.tensor(&key)
            .expect("the tensor is there")
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let hf_q = reorder_rows(
        b_q,
        8,
        TargetModule::Q,
        &dims,
        QkRowOrder::GgufInterleaved,
        QkRowOrder::HuggingFace,
    );
    assert_eq!(stored("q_proj"), hf_q);
    assert_ne!(stored("q_proj"), *b_q, "q's rows are permuted on disk");
    assert_eq!(stored("v_proj"), trained.layers[&(0, TargetModule::V)].b);
}
