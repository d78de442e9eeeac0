//! `POST /v1/completions`: the request as sent ([`CompletionRequest`]) becomes a
//! [`ValidCompletion`]: the model resolved, each prompt (text or token ids) tokenized, the
//! sampling fields checked once per prompt against the context, and scoring (`max_tokens: 0`
//! with `echo`) told apart from generation.

use serde_json::Value;

use crate::api::error::ApiError;
use crate::api::extract::ApiJson;
use crate::api::protocol::{CompletionRequest, SamplingFields};
use crate::api::state::{ResolvedModel, Serving};
use crate::engine::loaded_model::LoadedModel;

use super::{logprobs_count, plan, reject_if_set, GenerationPlan, PlanInputs};

/// OpenAI's default `max_tokens` for this endpoint.
const DEFAULT_MAX_TOKENS: u64 = 16;

/// One prompt of the request, tokenized.
pub struct CompletionPrompt {
    pub tokens: Vec<u32>,
    /// The prompt's text (decoded, when it was sent as token ids), for `echo`.
    pub text: String,
}

/// A text-completion request the engine can serve exactly as asked.
pub struct ValidCompletion {
    /// The `model` the client named, echoed in responses.
    pub model_name: String,
    /// What that name resolved to on arrival.
    pub model: ResolvedModel,
    pub prompts: Vec<CompletionPrompt>,
    /// One plan per prompt, in order; all share `n`, `stream` and `include_usage`.
    pub plans: Vec<GenerationPlan>,
    pub echo: bool,
    /// Alternatives per token in the legacy log-probs, when asked for.
    pub top_logprobs: Option<usize>,
    /// Tokens to generate per choice; 0 only with `echo`: the prompts are scored, not continued.
    pub max_tokens: usize,
    pub stream: bool,
}

impl ValidCompletion {
    pub fn new(body: &ApiJson, serving: &Serving, max_choices: usize) -> Result<Self, ApiError> {
        let request: CompletionRequest = body.parse()?;
        let sampling: SamplingFields = body.parse()?;
        reject_if_set(
            "suffix",
            &request.suffix,
            "insertion (fill-in-the-middle) is not implemented",
        )?;
        if request.best_of.is_some_and(|b| b != 1) {
            return Err(ApiError::unsupported(
                "best_of",
                "server-side best-of sampling is not implemented; use `n`",
            ));
        }
        let model = serving.resolve_model(&request.model)?;
        let llm = &serving.model;

        let echo = request.echo.unwrap_or(false);
        let top_logprobs = request
            .logprobs
            .map(|n| logprobs_count("logprobs", n))
            .transpose()?;
        let max_tokens = sampling.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        let stream = sampling.stream.unwrap_or(false);
        if max_tokens == 0 && !echo {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens` must be at least 1, or 0 together with `echo: true` to score the prompt",
            ));
        }
        if max_tokens == 0 && stream {
            return Err(ApiError::invalid(
                "max_tokens",
                "`max_tokens: 0` (scoring the prompt) returns one response; set `stream: false`",
            ));
        }
        let max_tokens = usize::try_from(max_tokens).unwrap_or(usize::MAX);

        let prompts = parse_prompts(&request.prompt, llm)?;
        let context_length = llm.transformer.config.context_length;
        let stop_token_ids = llm.tokenizer.eog_ids();
        let plans = prompts
            .iter()
            .map(|prompt| {
                plan(
                    &sampling,
                    PlanInputs {
                        prompt_tokens: prompt.tokens.len(),
                        context_length,
                        // Checked as if generating one token, so a scoring request meets the same
                        // context limit as any other.
                        max_tokens: max_tokens.max(1),
                        max_tokens_field: "max_tokens",
                        top_logprobs,
                        stop_token_ids: stop_token_ids.clone(),
                        max_choices,
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            model_name: request.model,
            model,
            prompts,
            plans,
            echo,
            top_logprobs,
            max_tokens,
            stream,
        })
    }

    /// Choices per prompt.
    pub fn n(&self) -> usize {
        self.plans.first().map_or(1, |p| p.n)
    }

    pub fn include_usage(&self) -> bool {
        self.plans.first().is_some_and(|p| p.include_usage)
    }
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of such lists.
fn parse_prompts(prompt: &Value, model: &LoadedModel) -> Result<Vec<CompletionPrompt>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "`prompt` must be a string, a list of strings, a list of token ids or a list of token-id lists",
        )
    };
    let from_text = |text: &str| CompletionPrompt {
        tokens: model.tokenizer.encode_prompt(text),
        text: text.to_string(),
    };
    let from_ids = |ids: &[Value], param: String| -> Result<CompletionPrompt, ApiError> {
        let vocab = model.tokenizer.vocab_size();
        let tokens = ids
            .iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&id| (id as usize) < vocab)
                    .map(|id| id as u32)
                    .ok_or_else(|| {
                        ApiError::invalid(
                            param.clone(),
                            format!("`{param}` holds {v}, not a token id below the vocabulary size {vocab}"),
                        )
                    })
            })
            .collect::<Result<Vec<u32>, ApiError>>()?;
        Ok(CompletionPrompt {
            text: model.tokenizer.decode(&tokens),
            tokens,
        })
    };
    let prompts = match prompt {
        Value::String(text) => vec![from_text(text)],
        Value::Array(items) if items.is_empty() => return Err(bad()),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            vec![from_ids(items, "prompt".into())?]
        }
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| match item {
                Value::String(text) => Ok(from_text(text)),
                Value::Array(ids) => from_ids(ids, format!("prompt[{i}]")),
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    if let Some(i) = prompts.iter().position(|p| p.tokens.is_empty()) {
        return Err(ApiError::invalid(
            if prompts.len() == 1 {
                "prompt".to_string()
            } else {
                format!("prompt[{i}]")
            },
            "the prompt is empty; give at least one token of text",
        ));
    }
    Ok(prompts)
}
