//! Validation: from what a client sent (the wire types of [`super::protocol`]) to what the
//! engine or the training service runs. Every endpoint's request becomes its validated type in
//! one place here ([`chat::ValidChat`], [`completion::ValidCompletion`], the training service's
//! `NewJob` from [`mezo_job`] and [`openai_job`], its `Feedback` from [`feedback`], an uploaded
//! file from [`file_upload`], an adapter folder to load from [`runtime_lora`]); handlers
//! then only submit and render. Every check names the field and the allowed range, and every
//! OpenAI feature the engine lacks is refused by name, so the engine only sees requests it can
//! serve exactly as asked. This file holds what chat and text completions share: the sampling
//! fields, checked into a [`GenerationPlan`].

pub mod chat;
pub mod completion;
pub mod feedback;
pub mod file_upload;
pub mod listing;
pub mod mezo_job;
pub mod openai_job;
pub mod runtime_lora;
pub mod training_data;

use serde_json::Value;

use crate::engine::generate::{GenerationParams, StopConditions};
use crate::engine::sampler::SamplingParams;

use super::error::ApiError;
use super::protocol::{SamplingFields, StopField};

/// OpenAI's limits.
const MAX_STOP_STRINGS: usize = 4;
pub const MAX_TOP_LOGPROBS: u64 = 20;

/// How one request is to be generated.
#[derive(Debug, Clone)]
pub struct GenerationPlan {
    /// Parameters of choice 0; choice `i` differs only in its seed (see [`Self::choice`]).
    pub params: GenerationParams,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
}

impl GenerationPlan {
    /// Parameters of choice `index`: with a seed, each choice gets its own (seed + index), so
    /// `n` sampled choices differ yet the whole response stays reproducible.
    pub fn choice(&self, index: usize) -> GenerationParams {
        let mut params = self.params.clone();
        params.sampling.seed = params.sampling.seed.map(|s| s.wrapping_add(index as u64));
        params
    }
}

/// What the endpoint decided before sampling fields are read.
pub struct PlanInputs {
    pub prompt_tokens: usize,
    pub context_length: usize,
    /// Tokens to generate (already defaulted by the endpoint).
    pub max_tokens: usize,
    /// Name of the field `max_tokens` came from, for error messages.
    pub max_tokens_field: &'static str,
    pub top_logprobs: Option<usize>,
    pub stop_token_ids: Vec<u32>,
    pub max_choices: usize,
}

/// Checks the sampling fields shared by chat and completions and builds the plan.
pub fn plan(fields: &SamplingFields, inputs: PlanInputs) -> Result<GenerationPlan, ApiError> {
    if let Some(bias) = &fields.logit_bias {
        if !is_empty_value(bias) {
            return Err(ApiError::unsupported(
                "logit_bias",
                "per-token logit biases are not implemented",
            ));
        }
    }
    let temperature = fields.temperature.unwrap_or(1.0);
    check_range("temperature", temperature, 0.0, 2.0)?;
    let top_p = fields.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("`top_p` must be greater than 0 and at most 1 (given {top_p})"),
        ));
    }
    let presence_penalty = fields.presence_penalty.unwrap_or(0.0);
    check_range("presence_penalty", presence_penalty, -2.0, 2.0)?;
    let frequency_penalty = fields.frequency_penalty.unwrap_or(0.0);
    check_range("frequency_penalty", frequency_penalty, -2.0, 2.0)?;

    let n = fields.n.unwrap_or(1);
    if n == 0 || n > inputs.max_choices as u64 {
        return Err(ApiError::invalid(
            "n",
            format!(
                "`n` must be between 1 and {} (given {n}; scheduler.max_choices)",
                inputs.max_choices
            ),
        ));
    }

    let stop_strings = match &fields.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(list)) => list.clone(),
    };
    if stop_strings.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOP_STRINGS} strings (given {})",
                stop_strings.len()
            ),
        ));
    }
    if stop_strings.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "`stop` strings must not be empty",
        ));
    }

    let stream = fields.stream.unwrap_or(false);
    if fields.stream_options.is_some() && !stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let include_usage = fields
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);

    if inputs.prompt_tokens >= inputs.context_length {
        return Err(ApiError::context_length(
            "messages",
            format!(
                "the prompt is {} tokens, which leaves no room in this model's context of {} tokens; shorten it",
                inputs.prompt_tokens, inputs.context_length
            ),
        ));
    }
    if inputs.prompt_tokens + inputs.max_tokens > inputs.context_length {
        return Err(ApiError::context_length(
            inputs.max_tokens_field,
            format!(
                "the prompt is {} tokens and `{}` asks for {} more, over this model's context of {} tokens; lower `{}` to at most {}",
                inputs.prompt_tokens,
                inputs.max_tokens_field,
                inputs.max_tokens,
                inputs.context_length,
                inputs.max_tokens_field,
                inputs.context_length - inputs.prompt_tokens
            ),
        ));
    }

    Ok(GenerationPlan {
        params: GenerationParams {
            max_tokens: inputs.max_tokens,
            sampling: SamplingParams {
                temperature,
                top_p,
                top_k: fields.top_k.unwrap_or(0).try_into().unwrap_or(usize::MAX),
                presence_penalty,
                frequency_penalty,
                // Negative seeds are valid in OpenAI's API; their bits make a fine u64 seed.
                seed: fields.seed.map(|s| s as u64),
            },
            stop: StopConditions {
                token_ids: inputs.stop_token_ids,
                ignore_eos: fields.ignore_eos.unwrap_or(false),
                strings: stop_strings,
            },
            top_logprobs: inputs.top_logprobs,
        },
        n: n as usize,
        stream,
        include_usage,
    })
}

/// `max_tokens` as given: at least 1, else a 400 naming `field`.
pub fn positive_max_tokens(field: &'static str, value: u64) -> Result<usize, ApiError> {
    if value == 0 {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must be at least 1 (given 0)"),
        ));
    }
    Ok(usize::try_from(value).unwrap_or(usize::MAX))
}

/// A `top_logprobs`-style count: 0 to 20.
pub fn logprobs_count(field: &str, value: u64) -> Result<usize, ApiError> {
    if value > MAX_TOP_LOGPROBS {
        return Err(ApiError::invalid(
            field,
            format!("`{field}` must be between 0 and {MAX_TOP_LOGPROBS} (given {value})"),
        ));
    }
    Ok(value as usize)
}

/// Refuses a field this server does not implement, when the client actually set it.
pub fn reject_if_set(field: &str, value: &Option<Value>, what: &str) -> Result<(), ApiError> {
    match value {
        Some(v) if !v.is_null() => Err(ApiError::unsupported(field, what)),
        _ => Ok(()),
    }
}

fn check_range(field: &str, value: f32, min: f32, max: f32) -> Result<(), ApiError> {
    if value.is_finite() && (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            format!("`{field}` must be between {min} and {max} (given {value})"),
        ))
    }
}

fn is_empty_value(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(list) => list.is_empty(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs() -> PlanInputs {
        PlanInputs {
            prompt_tokens: 10,
            context_length: 100,
            max_tokens: 20,
            max_tokens_field: "max_tokens",
            top_logprobs: None,
            stop_token_ids: vec![2],
            max_choices: 4,
        }
    }

    fn fields(json: serde_json::Value) -> SamplingFields {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        for (json, field) in [
            (serde_json::json!({"temperature": -0.1}), "temperature"),
            (serde_json::json!({"temperature": 2.5}), "temperature"),
            (serde_json::json!({"top_p": 0.0}), "top_p"),
            (
                serde_json::json!({"presence_penalty": 3.0}),
                "presence_penalty",
            ),
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"n": 5}), "n"),
            (
                serde_json::json!({"stop": ["a", "b", "c", "d", "e"]}),
                "stop",
            ),
            (serde_json::json!({"stop": ""}), "stop"),
            (
                serde_json::json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                serde_json::json!({"logit_bias": {"50256": -100}}),
                "logit_bias",
            ),
        ] {
            let err = plan(&fields(json.clone()), inputs()).unwrap_err();
            assert_eq!(err.param.as_deref(), Some(field), "{json}");
        }
    }

    #[test]
    fn the_context_window_is_enforced() {
        let err = plan(
            &fields(serde_json::json!({})),
            PlanInputs {
                max_tokens: 91,
                ..inputs()
            },
        )
        .unwrap_err();
        assert_eq!(err.code, Some("context_length_exceeded"));
        assert!(err.message.contains("at most 90"), "{}", err.message);
        plan(
            &fields(serde_json::json!({})),
            PlanInputs {
                max_tokens: 90,
                ..inputs()
            },
        )
        .unwrap();
    }

    #[test]
    fn choices_get_distinct_seeds_and_defaults_follow_openai() {
        let plan = plan(
            &fields(serde_json::json!({"seed": -1, "n": 2, "stop": "END"})),
            inputs(),
        )
        .unwrap();
        assert_eq!(plan.params.sampling.temperature, 1.0);
        assert_eq!(plan.choice(0).sampling.seed, Some(u64::MAX));
        assert_eq!(plan.choice(1).sampling.seed, Some(0));
        assert_eq!(plan.params.stop.strings, vec!["END".to_string()]);
        assert!(!plan.stream);
    }
}
