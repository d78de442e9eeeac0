//! An engine with hand-set outputs, for checking objectives against hand-computed losses.
//!
//! Tokens are the bytes of the text. The log-prob of token `b` is `−0.5·(b − b'a' + 1)` (so "a"
//! scores −0.5, "b" −1.0, "c" −1.5, …) plus the adapter's *shift*, the first value of its first A
//! matrix: tests move an adapter's log-probs by setting that value. Greedy answers are looked up
//! by the adapter's shift. Every tokenize call is recorded with its `special` flag.

use std::cell::RefCell;

use adapters::{LoraAdapter, LoraConfig, ModelDims};
use plugin::{ScoreRequest, ZoEngine};

#[derive(Default)]
pub struct FakeEngine {
    /// `(shift, answers)`: the greedy answers, one per prompt, of adapters with that shift.
    pub answers: Vec<(f32, Vec<String>)>,
    /// `(text, special)` of every tokenize call.
    pub tokenized: RefCell<Vec<(String, bool)>>,
}

#[derive(Debug, thiserror::Error)]
#[error("no answers for an adapter with shift {0}")]
pub struct NoAnswers(f32);

/// A small adapter whose log-prob shift is `shift`.
pub fn shifted_adapter(shift: f32) -> LoraAdapter {
    let dims = ModelDims {
        n_layer: 1,
        hidden: 4,
        n_head: 1,
        n_kv_head: 1,
        head_dim: 4,
        ffn: 4,
        qk_rows: adapters::QkRowOrder::HuggingFace,
    };
    let config = LoraConfig {
        rank: 1,
        ..LoraConfig::default()
    };
    let mut adapter = LoraAdapter::new_initialized(config, dims, 0).unwrap();
    adapter.params_mut().next().unwrap()[0] = shift;
    adapter
}

fn shift(adapter: &LoraAdapter) -> f32 {
    adapter.params().next().unwrap()[0]
}

impl ZoEngine for FakeEngine {
    type Error = NoAnswers;

    fn tokenize(&self, text: &str, special: bool) -> Vec<u32> {
        self.tokenized
            .borrow_mut()
            .push((text.to_string(), special));
        text.bytes().map(u32::from).collect()
    }

    fn score(
        &self,
        adapters: &[&LoraAdapter],
        items: &[ScoreRequest],
    ) -> Result<Vec<Vec<Vec<Vec<f32>>>>, Self::Error> {
        Ok(adapters
            .iter()
            .map(|adapter| {
                items
                    .iter()
                    .map(|item| {
                        item.continuations
                            .iter()
                            .map(|c| {
                                c.iter()
                                    .map(|&b| {
                                        -0.5 * (b as f32 - b'a' as f32 + 1.0) + shift(adapter)
                                    })
                                    .collect()
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect())
    }

    fn generate_greedy(
        &self,
        adapters: &[&LoraAdapter],
        prompts: &[Vec<u32>],
        _max_tokens: usize,
    ) -> Result<Vec<Vec<String>>, Self::Error> {
        adapters
            .iter()
            .map(|adapter| {
                let shift = shift(adapter);
                let (_, answers) = self
                    .answers
                    .iter()
                    .find(|(s, _)| *s == shift)
                    .ok_or(NoAnswers(shift))?;
                // Fewer answers than prompts is allowed: tests use it to answer with the wrong shape.
                Ok(answers.iter().take(prompts.len()).cloned().collect())
            })
            .collect()
    }
}
