//! Generation: sequences that decode token by token, many at once in one batched forward.
//!
//! A [`Sequence`] owns everything one request's generation needs (its key/value cache, the
//! adapter view it started with, its sampler, its stop conditions), so a scheduler can add and
//! drop sequences between steps: [`step`] runs every unfinished sequence one token forward —
//! the whole prompt for a sequence that just joined (prefill), one token for the others — in a
//! single packed batch, and reports what each produced. [`generate`] loops `step` to the end.

use std::sync::Arc;

use super::batch::{BatchRow, RowCache};
use super::kv_cache::KvCache;
use super::lora::AdapterView;
use super::sampler::{log_softmax_row, top_logprobs, Sampler, SamplingParams, TokenLogprob};
use super::tokenizer::{DecodeStream, Tokenizer};
use super::transformer::Transformer;
use super::{EngineError, Result};

/// When a sequence stops, besides `max_tokens`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopConditions {
    /// Tokens that end generation and are not part of the output (the model's end-of-turn ids).
    pub token_ids: Vec<u32>,
    /// Generate past those tokens until `max_tokens` or a stop string (vLLM's `ignore_eos`,
    /// for benchmarks and tests that need answers of a known length); they stay out of the
    /// output either way.
    pub ignore_eos: bool,
    /// Strings that end generation; the output stops just before the first one.
    pub strings: Vec<String>,
}

/// Everything a caller chooses about one generation.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: StopConditions,
    /// Report each sampled token's log-prob and this many alternatives (`None`: no log-probs).
    pub top_logprobs: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` was reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What one sequence produced in one step.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    /// The sampled token (also when it is a stop token, which adds no text).
    pub token: u32,
    /// Text released by this step: may be empty while a possible stop string or an incomplete
    /// UTF-8 sequence is held back, and may carry held text released at the end.
    pub text: String,
    pub logprob: Option<TokenLogprob>,
    pub top_logprobs: Vec<TokenLogprob>,
    pub finish: Option<FinishReason>,
}

/// Holds back text that might be the start of a stop string, so a stop string is never emitted.
#[derive(Debug, Default)]
struct StopStringMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopStringMatcher {
    /// Adds text; returns the text safe to release and whether a stop string was found.
    fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(pos) = first_stop {
            let released = self.held[..pos].to_string();
            self.held.clear();
            return (released, true);
        }
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let released = self.held[..keep].to_string();
        self.held.drain(..keep);
        (released, false)
    }

    fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// One generation in progress.
#[derive(Debug)]
pub struct Sequence {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    cache: KvCache,
    adapter: Option<Arc<AdapterView>>,
    sampler: Sampler,
    params: GenerationParams,
    decoder: DecodeStream,
    stop_strings: StopStringMatcher,
    text: String,
    finish: Option<FinishReason>,
}

impl Sequence {
    /// Checks the request against the model's limits and prepares an empty cache.
    pub fn new(
        model: &Transformer,
        prompt: Vec<u32>,
        adapter: Option<Arc<AdapterView>>,
        params: GenerationParams,
    ) -> Result<Self> {
        let c = &model.config;
        let cache = KvCache::new(c.n_layer, c.n_kv_head, c.head_dim);
        Self::with_cached_prefix(model, prompt, adapter, params, cache)
    }

    /// Like [`Self::new`], starting from `cache`, which holds the keys and values of the
    /// prompt's first `cache.len()` tokens computed under the same adapter view (a prefix-cache
    /// hit): only the rest of the prompt is prefilled.
    pub fn with_cached_prefix(
        model: &Transformer,
        prompt: Vec<u32>,
        adapter: Option<Arc<AdapterView>>,
        params: GenerationParams,
        cache: KvCache,
    ) -> Result<Self> {
        params.sampling.validate()?;
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest(
                "the prompt is empty; give at least one token".into(),
            ));
        }
        if params.max_tokens == 0 {
            return Err(EngineError::InvalidRequest(
                "`max_tokens` must be at least 1 (given 0)".into(),
            ));
        }
        let limit = model.config.context_length;
        if prompt.len() + params.max_tokens > limit {
            return Err(EngineError::ContextOverflow {
                tokens: prompt.len(),
                requested: params.max_tokens,
                limit,
            });
        }
        if cache.len() >= prompt.len() {
            return Err(EngineError::InvalidRequest(format!(
                "a cached prefix of {} tokens leaves nothing of the {}-token prompt to feed",
                cache.len(),
                prompt.len()
            )));
        }
        Ok(Self {
            cache,
            sampler: Sampler::new(params.sampling.clone()),
            stop_strings: StopStringMatcher {
                stops: params.stop.strings.clone(),
                held: String::new(),
            },
            prompt,
            generated: Vec::new(),
            adapter,
            params,
            decoder: DecodeStream::new(),
            text: String::new(),
            finish: None,
        })
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// The adapter view the sequence runs under.
    pub fn adapter(&self) -> &Option<Arc<AdapterView>> {
        &self.adapter
    }

    /// Keys and values computed so far (after the first step: the whole prompt).
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Tokens sampled so far (a final stop token included).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Text released so far.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// The tokens the next forward must feed: the prompt (past any cached prefix) first, then
    /// the last sampled token.
    fn next_input(&self) -> &[u32] {
        if self.generated.is_empty() {
            &self.prompt[self.cache.len()..]
        } else {
            let n = self.generated.len();
            &self.generated[n - 1..]
        }
    }

    /// Consumes the logits of the last fed position: samples, applies stop rules, releases text.
    fn advance(&mut self, tokenizer: &Tokenizer, logits: &[f32]) -> TokenEvent {
        let token = self.sampler.sample(logits);
        let (logprob, top) = match self.params.top_logprobs {
            Some(n) => {
                let lp = log_softmax_row(logits);
                let chosen = TokenLogprob {
                    token,
                    logprob: lp.get(token as usize).copied().unwrap_or(f32::NEG_INFINITY),
                };
                (Some(chosen), top_logprobs(&lp, n))
            }
            None => (None, Vec::new()),
        };
        self.generated.push(token);
        let mut text = String::new();
        if self.params.stop.token_ids.contains(&token) {
            if !self.params.stop.ignore_eos {
                self.finish = Some(FinishReason::Stop);
            }
        } else if !tokenizer.is_control(token) {
            // A chat format's markers (`<|im_start|>` after an ignored end of turn) are not text.
            let piece = self.decoder.push(tokenizer, token).unwrap_or_default();
            let (released, stopped) = self.stop_strings.push(&piece);
            text = released;
            if stopped {
                self.finish = Some(FinishReason::Stop);
            }
        }
        // `Sequence::new` checked that prompt + max_tokens fits the context, so max_tokens is
        // the only length limit to watch here.
        if self.finish.is_none() && self.generated.len() >= self.params.max_tokens {
            self.finish = Some(FinishReason::Length);
        }
        if self.finish == Some(FinishReason::Length) {
            // Release what was held back: nothing more can complete a stop string.
            let rest = self.decoder.flush().unwrap_or_default();
            let (released, _) = self.stop_strings.push(&rest);
            text.push_str(&released);
            text.push_str(&self.stop_strings.flush());
        }
        self.text.push_str(&text);
        TokenEvent {
            token,
            text,
            logprob,
            top_logprobs: top,
            finish: self.finish,
        }
    }
}

/// Runs every unfinished sequence one step in one batched forward. Returns one event per
/// sequence (`None` for those already finished).
pub fn step(
    model: &Transformer,
    tokenizer: &Tokenizer,
    seqs: &mut [&mut Sequence],
) -> Result<Vec<Option<TokenEvent>>> {
    let active: Vec<usize> = (0..seqs.len())
        .filter(|&i| !seqs[i].is_finished())
        .collect();
    if active.is_empty() {
        return Ok(vec![None; seqs.len()]);
    }
    let inputs: Vec<Vec<u32>> = active
        .iter()
        .map(|&i| seqs[i].next_input().to_vec())
        .collect();
    let logits = {
        let mut rows = Vec::with_capacity(active.len());
        let mut remaining: Vec<Option<&mut Sequence>> =
            seqs.iter_mut().map(|s| Some(&mut **s)).collect();
        for (&i, tokens) in active.iter().zip(&inputs) {
            let seq = remaining[i].take().expect("each active index appears once");
            let Sequence { cache, adapter, .. } = seq;
            rows.push(BatchRow::last_logits(
                tokens,
                RowCache::Append(cache),
                adapter.as_deref(),
            ));
        }
        model.forward(&mut rows)?
    };
    let mut events = vec![None; seqs.len()];
    for (&i, logits) in active.iter().zip(logits) {
        let logits = logits.expect("generation rows request their last logits");
        let row: Vec<f32> = logits.squeeze(0)?.to_vec1()?;
        events[i] = Some(seqs[i].advance(tokenizer, &row));
    }
    Ok(events)
}

/// A prompt to answer greedily under its own adapter (training's `f1` and `exact_match`
/// objectives: θ+εz and θ−εz of a MeZO step, or θ for a held-out evaluation).
pub struct GreedyPrompt {
    pub prompt: Vec<u32>,
    pub adapter: Arc<AdapterView>,
}

/// Runs sequences to the end, calling `on_event(index, event)` for every token as it comes.
pub fn generate(
    model: &Transformer,
    tokenizer: &Tokenizer,
    seqs: &mut [Sequence],
    mut on_event: impl FnMut(usize, &TokenEvent),
) -> Result<()> {
    loop {
        let mut refs: Vec<&mut Sequence> = seqs.iter_mut().collect();
        if refs.iter().all(|s| s.is_finished()) {
            return Ok(());
        }
        for (i, event) in step(model, tokenizer, &mut refs)?.into_iter().enumerate() {
            if let Some(event) = event {
                on_event(i, &event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StopStringMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopStringMatcher {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            held: String::new(),
        };
        let mut out = String::new();
        for piece in pieces {
            let (released, stopped) = m.push(piece);
            out.push_str(&released);
            if stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn stop_string_split_across_pieces_is_never_emitted() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D tail"]),
            ("abc ".into(), true)
        );
    }

    #[test]
    fn held_prefix_is_released_when_it_does_not_complete() {
        assert_eq!(run(&["END"], &["abc E", "x"]), ("abc Ex".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins_and_multibyte_text_is_kept_whole() {
        assert_eq!(run(&["ö!", "b"], &["aé", "ö", "!b"]), ("aé".into(), true));
    }
}
