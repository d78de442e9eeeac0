//! LoRA and MeZO on Gemma 3 270M. An adapter on every module equals its delta merged into the
//! weights of a rewritten GGUF (Gemma's file keeps Hugging Face's q/k rows, so PEFT's adapters
//! apply as they are); a trained adapter saves under PEFT's module names and reloads bit for
//! bit; and MeZO steps with the defaults lower a completion loss on this base model.

mod common;

use adapters::{LoraAdapter, LoraConfig, QkRowOrder, TargetModule};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use mezo_server::engine::batch::{BatchRow, RowCache};
use mezo_server::engine::loaded_model::LoadedModel;
use mezo_server::engine::lora::AdapterView;
use mezo_server::engine::transformer::{log_softmax, Transformer};
use mezo_server::engine::weights::WeightMode;
use plugin::{ObjectiveKind, Trainer, TrainerConfig, TrainingExample, ZoEngine};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::SafeTensors;

/// The GGUF tensor a LoRA target adapts in block `layer`.
fn gguf_tensor(layer: usize, module: TargetModule) -> String {
    let name = match module {
        TargetModule::Q => "attn_q",
        TargetModule::K => "attn_k",
        TargetModule::V => "attn_v",
        TargetModule::O => "attn_output",
        TargetModule::Gate => "ffn_gate",
        TargetModule::Up => "ffn_up",
        TargetModule::Down => "ffn_down",
    };
    format!("blk.{layer}.{name}.weight")
}

fn log_probs(model: &Transformer, tokens: &[u32], adapter: Option<&AdapterView>) -> Tensor {
    let mut rows = [BatchRow::all_logits(tokens, RowCache::None, adapter)];
    let logits = model.forward(&mut rows).expect("forward")[0]
        .take()
        .expect("logits");
    log_softmax(&logits).expect("log_softmax")
}

#[test]
fn an_adapter_on_every_module_equals_its_delta_merged_into_the_weights() {
    let path = common::gemma_model_path();
    let model = common::load_model_at(&path, WeightMode::F32);
    let dims = model.config.dims();
    assert_eq!(dims.qk_rows, QkRowOrder::HuggingFace);
    // Layer 0 is a sliding-window layer, layer 5 a global one.
    let config = LoraConfig {
        targets: TargetModule::ALL.to_vec(),
        layers: Some(vec![0, 5]),
        ..LoraConfig::default()
    };
    let scale = config.scale();
    let mut lora = LoraAdapter::new_initialized(config, dims, 5).expect("adapter");
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for layer in lora.layers.values_mut() {
        for b in layer.b.iter_mut() {
            *b = rng.gen_range(-0.01..0.01);
        }
    }
    let view = AdapterView::new(&lora, &dims).expect("view");
    let tokens = common::ids_of(&common::gemma_golden()["cases"][3], "ids");
    let adapted = log_probs(&model, &tokens, Some(&view));
    let base = log_probs(&model, &tokens, None);
    assert!(
        common::max_abs_diff(&adapted, &base) > 0.05,
        "the adapter must change the output for the comparison to mean anything"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let merged_path = dir.path().join("merged.gguf");
    common::write_variant_of(
        &path,
        &merged_path,
        |_| {},
        |name, tensor| {
            let Some((&(_, module), delta)) = lora
                .layers
                .iter()
                .find(|(&(layer, module), _)| gguf_tensor(layer, module) == name)
            else {
                return Some(tensor);
            };
            let (in_dim, out_dim) = module.dims(&dims);
            let r = delta.rank;
            let b = Tensor::from_slice(&delta.b, (out_dim, r), &Device::Cpu).expect("B");
            let a = Tensor::from_slice(&delta.a, (r, in_dim), &Device::Cpu).expect("A");
            let w = tensor.dequantize(&Device::Cpu).expect("dequantize");
            let merged = b
                .matmul(&a)
                .and_then(|ba| ba * f64::from(scale))
                .and_then(|d| w + d)
                .expect("W + s·B·A");
            Some(QTensor::quantize(&merged, GgmlDType::F32).expect("an f32 tensor"))
        },
        Vec::new(),
    );
    let merged = common::load_model_at(&merged_path, WeightMode::F32);
    let want = log_probs(&merged, &tokens, None);
    let diff = common::max_abs_diff(&adapted, &want);
    assert!(
        diff < 1e-3,
        "the adapter and its merged weights differ by {diff} in log-prob"
    );
}

fn gemma() -> LoadedModel {
    LoadedModel::load(&common::gemma_model_path(), WeightMode::default()).expect("load Gemma 3")
}

#[test]
fn a_trained_adapter_saves_under_peft_names_and_reloads_bit_for_bit() {
    let model = gemma();
    let dims = model.transformer.config.dims();
    let config = LoraConfig {
        targets: vec![TargetModule::Q, TargetModule::K, TargetModule::V],
        ..LoraConfig::default()
    };
    let initial = LoraAdapter::new_initialized(config, dims, 3).expect("adapter");
    let trainer_config = TrainerConfig {
        lr: 1e-2,
        batch_size: 4,
        max_steps: 1,
        seed: 2,
        ..TrainerConfig::default()
    };
    let objective = ObjectiveKind::Classification.build().expect("objective");
    let mut trainer = Trainer::new(
        trainer_config,
        objective,
        initial,
        common::four_reviews(),
        Vec::new(),
    )
    .expect("trainer");
    trainer.step(&model).expect("step");
    let trained = trainer.adapter();
    let b_q = &trained.layers[&(0, TargetModule::Q)].b;
    assert!(b_q.iter().any(|&b| b != 0.0), "training moved q's B");

    let dir = tempfile::tempdir().expect("tempdir");
    adapters::peft::save(trained, dir.path(), "gemma-3-270m").expect("save");
    let reloaded = adapters::peft::load(dir.path(), &dims).expect("load");
    assert_eq!(&reloaded, trained);
    let items = common::sentiment_items(&model, &["Review: a gorgeous, witty film.\nSentiment:"]);
    assert_eq!(
        model.score(&[trained], &items).expect("score"),
        model.score(&[&reloaded], &items).expect("score"),
        "the reloaded adapter scores bit for bit the same"
    );

    // PEFT's key for Gemma3ForCausalLM's q_proj, holding the engine's rows as they are.
    let bytes = std::fs::read(dir.path().join(adapters::peft::WEIGHTS_FILE)).expect("read");
    let file = SafeTensors::deserialize(&bytes).expect("safetensors");
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let stored: Vec<f32> = file
        .tensor(key)
        .expect("q_proj's B under PEFT's name")
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(&stored, b_q);
}

#[test]
fn mezo_steps_with_the_defaults_lower_a_completion_loss() {
    let model = gemma();
    let examples = common::green_answers();
    let dims = model.transformer.config.dims();
    let adapter = LoraAdapter::new_initialized(LoraConfig::default(), dims, 0).expect("adapter");
    let steps = 20;
    let config = TrainerConfig {
        batch_size: 4,
        max_steps: steps,
        seed: 1,
        ..TrainerConfig::default()
    };
    let objective = ObjectiveKind::Completion.build().expect("objective");
    let mut trainer =
        Trainer::new(config, objective, adapter, examples.clone(), Vec::new()).expect("trainer");
    let refs: Vec<&TrainingExample> = examples.iter().collect();
    let loss = |trainer: &Trainer| {
        trainer
            .objective()
            .evaluate(&model, trainer.adapter(), &refs)
            .expect("evaluate")
            .loss
    };
    let before = loss(&trainer);
    for _ in 0..steps {
        trainer.step(&model).expect("step");
    }
    let after = loss(&trainer);
    assert!(
        after < before,
        "{steps} steps of the defaults should lower the completion loss: {before} -> {after}"
    );
}
