//! A tiny random-weight language model on candle, the engine of the end-to-end tests.
//!
//! Vocabulary 16 (the characters of [`ALPHABET`]), hidden size 8, one block with LoRA on its q
//! and v projections. A position's state is the mean of the embeddings up to it (causal), so a
//! continuation's log-probs depend on the prompt and on the tokens before it:
//! `h = causal_mean(E[x])`, `q = h·(Wq + s·Bq·Aq)ᵀ`, `v = h·(Wv + s·Bv·Av)ᵀ`,
//! `logits = (h + tanh(q) ⊙ v)·Uᵀ`. The same forward runs on plain tensors (the engine) and on
//! `Var`s (the true gradient for the estimator test), so both see exactly the same function.

use std::cell::RefCell;

use adapters::{LoraAdapter, LoraConfig, ModelDims, TargetModule};
use candle_core::{DType, Device, Tensor, Var};
use plugin::{ScoreRequest, ZoEngine};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// Token `t` is the character `ALPHABET[t]`.
pub const ALPHABET: &str = " abcdefghijklmno";
pub const VOCAB: usize = 16;
pub const HIDDEN: usize = 8;

/// q and v map 8 → 8 (2 heads of 4).
pub const DIMS: ModelDims = ModelDims {
    n_layer: 1,
    hidden: HIDDEN,
    n_head: 2,
    n_kv_head: 2,
    head_dim: 4,
    ffn: 16,
    qk_rows: adapters::QkRowOrder::HuggingFace,
};

/// Rank 4 on q and v: 2 modules × (A 4×8 + B 8×4) = 128 trainable values.
pub fn lora_config() -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec![TargetModule::Q, TargetModule::V],
        use_rslora: false,
        layers: None,
    }
}

/// An adapter as PEFT initialises one, but with B drawn too (N(0, 0.5²)), so that A has a
/// gradient (with B = 0, ∂L/∂A = 0) and the estimator test covers every parameter.
pub fn adapter_with_nonzero_b(seed: u64) -> LoraAdapter {
    let mut adapter = LoraAdapter::new_initialized(lora_config(), DIMS, seed).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xB);
    let normal = Normal::new(0.0f32, 0.5).unwrap();
    for b in adapter.layers.values_mut().flat_map(|l| l.b.iter_mut()) {
        *b = normal.sample(&mut rng);
    }
    adapter
}

/// The LoRA tensors of one adapter, in `params()` order: Aq, Bq, Av, Bv.
pub struct LoraTensors {
    pub aq: Tensor,
    pub bq: Tensor,
    pub av: Tensor,
    pub bv: Tensor,
    pub scale: f64,
}

impl LoraTensors {
    pub fn from_adapter(adapter: &LoraAdapter) -> Self {
        let layer = |module| &adapter.layers[&(0, module)];
        let (q, v) = (layer(TargetModule::Q), layer(TargetModule::V));
        let tensor = |data: &[f32], rows, cols| {
            Tensor::from_slice(data, (rows, cols), &Device::Cpu).unwrap()
        };
        Self {
            aq: tensor(&q.a, q.rank, q.in_dim),
            bq: tensor(&q.b, q.out_dim, q.rank),
            av: tensor(&v.a, v.rank, v.in_dim),
            bv: tensor(&v.b, v.out_dim, v.rank),
            scale: f64::from(adapter.config.scale()),
        }
    }
}

pub struct TinyModel {
    embed: Tensor,
    wq: Tensor,
    wv: Tensor,
    unembed: Tensor,
    /// The number of adapters passed to each `score` call, in order: lets tests see how the
    /// plugin batched its work.
    pub score_calls: RefCell<Vec<usize>>,
}

impl TinyModel {
    /// Weights drawn from N(0, 1) (embeddings, unembedding) and N(0, 1/hidden) (projections).
    pub fn new(seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensor = |rows: usize, cols: usize, std: f32| {
            let normal = Normal::new(0.0f32, std).unwrap();
            let data: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
            Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap()
        };
        let projection_std = 1.0 / (HIDDEN as f32).sqrt();
        Self {
            embed: tensor(VOCAB, HIDDEN, 1.0),
            wq: tensor(HIDDEN, HIDDEN, projection_std),
            wv: tensor(HIDDEN, HIDDEN, projection_std),
            unembed: tensor(VOCAB, HIDDEN, 1.0),
            score_calls: RefCell::new(Vec::new()),
        }
    }

    /// Log-softmax over the vocabulary at every position of `tokens`: `[len, VOCAB]`.
    pub fn log_probs(&self, tokens: &[u32], lora: &LoraTensors) -> candle_core::Result<Tensor> {
        let len = tokens.len();
        let ids = Tensor::new(tokens, &Device::Cpu)?;
        let xs = self.embed.index_select(&ids, 0)?;
        // Row i averages positions 0..=i.
        let counts: Vec<f32> = (0..len).map(|i| 1.0 / (i + 1) as f32).collect();
        let causal_mean = Tensor::tril2(len, DType::F32, &Device::Cpu)?
            .broadcast_mul(&Tensor::from_vec(counts, (len, 1), &Device::Cpu)?)?;
        let hs = causal_mean.matmul(&xs)?;
        let q = lora_linear(&hs, &self.wq, &lora.aq, &lora.bq, lora.scale)?;
        let v = lora_linear(&hs, &self.wv, &lora.av, &lora.bv, lora.scale)?;
        let hs = (hs + q.tanh()?.mul(&v)?)?;
        let logits = hs.matmul(&self.unembed.t()?)?;
        // Logits stay small here (|logit| ≲ 20), so the unshifted log-sum-exp cannot overflow.
        let log_norm = logits.exp()?.sum_keepdim(1)?.log()?;
        logits.broadcast_sub(&log_norm)
    }

    /// The completion loss of the plugin's `Completion` objective, as a differentiable tensor:
    /// mean over items of the mean NLL of the continuation tokens.
    pub fn completion_loss(
        &self,
        items: &[(Vec<u32>, Vec<u32>)],
        lora: &LoraTensors,
    ) -> candle_core::Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for (prompt, completion) in items {
            let tokens: Vec<u32> = prompt.iter().chain(completion).copied().collect();
            let log_probs = self.log_probs(&tokens, lora)?;
            // Rows predicting the completion tokens, and a one-hot mask picking each target.
            let rows = log_probs.narrow(0, prompt.len() - 1, completion.len())?;
            let mut one_hot = vec![0f32; completion.len() * VOCAB];
            for (i, &t) in completion.iter().enumerate() {
                one_hot[i * VOCAB + t as usize] = 1.0;
            }
            let one_hot = Tensor::from_vec(one_hot, (completion.len(), VOCAB), &Device::Cpu)?;
            let nll = (rows.mul(&one_hot)?.sum_all()?.neg()? / completion.len() as f64)?;
            total = Some(match total {
                Some(t) => (t + nll)?,
                None => nll,
            });
        }
        let total = total.expect("at least one item");
        total / items.len() as f64
    }

    /// ∂(completion loss)/∂θ at `adapter`, flattened in `params()` order, by candle's autograd.
    pub fn completion_gradient(
        &self,
        items: &[(Vec<u32>, Vec<u32>)],
        adapter: &LoraAdapter,
    ) -> Vec<f32> {
        let plain = LoraTensors::from_adapter(adapter);
        let vars =
            [&plain.aq, &plain.bq, &plain.av, &plain.bv].map(|t| Var::from_tensor(t).unwrap());
        let lora = LoraTensors {
            aq: vars[0].as_tensor().clone(),
            bq: vars[1].as_tensor().clone(),
            av: vars[2].as_tensor().clone(),
            bv: vars[3].as_tensor().clone(),
            scale: plain.scale,
        };
        let loss = self.completion_loss(items, &lora).unwrap();
        let grads = loss.backward().unwrap();
        vars.iter()
            .flat_map(|var| {
                let grad = grads
                    .get(var.as_tensor())
                    .expect("every LoRA tensor has a gradient");
                grad.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect()
    }
}

/// `xs·(W + s·B·A)ᵀ`, computed as `xs·Wᵀ + s·(xs·Aᵀ)·Bᵀ` the way LoRA engines do.
fn lora_linear(
    xs: &Tensor,
    w: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let base = xs.matmul(&w.t()?)?;
    let low_rank = xs.matmul(&a.t()?)?.matmul(&b.t()?)?;
    base + (low_rank * scale)?
}

/// Characters of [`ALPHABET`] to their index; anything else is a space.
pub fn encode(text: &str) -> Vec<u32> {
    text.chars()
        .map(|c| ALPHABET.find(c).unwrap_or(0) as u32)
        .collect()
}

impl ZoEngine for TinyModel {
    type Error = candle_core::Error;

    fn tokenize(&self, text: &str, _special: bool) -> Vec<u32> {
        encode(text)
    }

    fn score(
        &self,
        adapters: &[&LoraAdapter],
        items: &[ScoreRequest],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>, Self::Error> {
        self.score_calls.borrow_mut().push(adapters.len());
        adapters
            .iter()
            .map(|adapter| {
                let lora = LoraTensors::from_adapter(adapter);
                items
                    .iter()
                    .map(|item| {
                        item.continuations
                            .iter()
                            .map(|continuation| {
                                let tokens: Vec<u32> =
                                    item.prompt.iter().chain(continuation).copied().collect();
                                let log_probs = self.log_probs(&tokens, &lora)?.to_vec2::<f32>()?;
                                let first = item.prompt.len() - 1;
                                Ok(continuation
                                    .iter()
                                    .enumerate()
                                    .map(|(j, &t)| log_probs[first + j][t as usize])
                                    .collect())
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect()
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        max_tokens: usize,
    ) -> Result<Vec<Vec<String>>, Self::Error> {
        adapters
            .iter()
            .map(|adapter| {
                let lora = LoraTensors::from_adapter(adapter);
                prompts
                    .iter()
                    .map(|prompt| {
                        let mut tokens = prompt.clone();
                        for _ in 0..max_tokens {
                            let log_probs = self.log_probs(&tokens, &lora)?.to_vec2::<f32>()?;
                            let last = &log_probs[tokens.len() - 1];
                            let next =
                                (0..VOCAB)
                                    .fold(0, |best, t| if last[t] > last[best] { t } else { best });
                            tokens.push(next as u32);
                        }
                        Ok(tokens[prompt.len()..]
                            .iter()
                            .map(|&t| ALPHABET.as_bytes()[t as usize] as char)
                            .collect())
                    })
                    .collect()
            })
            .collect()
    }
}
