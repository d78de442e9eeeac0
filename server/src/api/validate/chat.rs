//! `POST /v1/chat/completions`: the request as sent ([`ChatCompletionRequest`]) becomes a
//! [`ValidChat`]: the model resolved, the messages rendered with the chat template and tokenized,
//! every sampling field checked, and every OpenAI feature this server lacks refused by name.

use crate::api::error::ApiError;
use crate::api::extract::ApiJson;
use crate::api::protocol::{ChatCompletionRequest, ChatMessageIn, MessageContent, SamplingFields};
use crate::api::state::{ResolvedModel, Serving};
use crate::engine::chat_template::ChatMessage;

use super::{logprobs_count, plan, positive_max_tokens, reject_if_set, GenerationPlan, PlanInputs};

/// A chat request the engine can serve exactly as asked.
pub struct ValidChat {
    /// The `model` the client named, echoed in responses.
    pub model_name: String,
    /// What that name resolved to on arrival.
    pub model: ResolvedModel,
    /// The conversation rendered with the chat template: the prompt as the model sees it, and
    /// what feedback on the answer is stored with.
    pub prompt_text: String,
    pub prompt: Vec<u32>,
    pub plan: GenerationPlan,
}

impl ValidChat {
    pub fn new(body: &ApiJson, serving: &Serving, max_choices: usize) -> Result<Self, ApiError> {
        let request: ChatCompletionRequest = body.parse()?;
        let sampling: SamplingFields = body.parse()?;
        reject_unsupported(&request)?;
        let model = serving.resolve_model(&request.model)?;

        let messages = convert_messages(&request.messages, "")?;
        let llm = &serving.model;
        let template = llm
            .chat_template()
            .map_err(|err| ApiError::invalid("messages", err.to_string()))?;
        let prompt_text = template
            .render(&messages, true)
            .map_err(|err| ApiError::invalid("messages", err.to_string()))?;
        let prompt = llm.tokenizer.encode_prompt(&prompt_text);

        let top_logprobs = match (request.logprobs.unwrap_or(false), request.top_logprobs) {
            (true, n) => Some(logprobs_count("top_logprobs", n.unwrap_or(0))?),
            (false, Some(n)) if n > 0 => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "`top_logprobs` needs `logprobs: true`",
                ))
            }
            (false, _) => None,
        };
        let context_length = llm.transformer.config.context_length;
        let (max_tokens, max_tokens_field) =
            match (request.max_completion_tokens, sampling.max_tokens) {
                (Some(v), _) => (
                    positive_max_tokens("max_completion_tokens", v)?,
                    "max_completion_tokens",
                ),
                (None, Some(v)) => (positive_max_tokens("max_tokens", v)?, "max_tokens"),
                // OpenAI's default: until the model stops or the context is full.
                (None, None) => (context_length.saturating_sub(prompt.len()), "max_tokens"),
            };
        let plan = plan(
            &sampling,
            PlanInputs {
                prompt_tokens: prompt.len(),
                context_length,
                max_tokens,
                max_tokens_field,
                top_logprobs,
                stop_token_ids: llm.tokenizer.eog_ids(),
                max_choices,
            },
        )?;
        Ok(Self {
            model_name: request.model,
            model,
            prompt_text,
            prompt,
            plan,
        })
    }

    /// Whether the answer carries log-probs (`logprobs: true`).
    pub fn logprobs(&self) -> bool {
        self.plan.params.top_logprobs.is_some()
    }
}

fn reject_unsupported(request: &ChatCompletionRequest) -> Result<(), ApiError> {
    const TOOLS: &str = "tool and function calling are not implemented";
    reject_if_set("tools", &request.tools, TOOLS)?;
    reject_if_set("tool_choice", &request.tool_choice, TOOLS)?;
    reject_if_set("functions", &request.functions, TOOLS)?;
    reject_if_set("function_call", &request.function_call, TOOLS)?;
    reject_if_set("parallel_tool_calls", &request.parallel_tool_calls, TOOLS)?;
    if let Some(format) = &request.response_format {
        if format.get("type").and_then(|t| t.as_str()) != Some("text") && !format.is_null() {
            return Err(ApiError::unsupported(
                "response_format",
                "structured outputs and JSON mode are not implemented; only {\"type\": \"text\"}",
            ));
        }
    }
    reject_if_set("audio", &request.audio, "audio output is not implemented")?;
    if let Some(modalities) = &request.modalities {
        let text_only = modalities
            .as_array()
            .is_some_and(|m| m.iter().all(|x| x == "text"));
        if !text_only && !modalities.is_null() {
            return Err(ApiError::unsupported(
                "modalities",
                "only text output is implemented",
            ));
        }
    }
    reject_if_set(
        "prediction",
        &request.prediction,
        "predicted outputs are not implemented",
    )?;
    reject_if_set(
        "web_search_options",
        &request.web_search_options,
        "web search is not implemented",
    )?;
    reject_if_set(
        "reasoning_effort",
        &request.reasoning_effort,
        "this model has no reasoning mode",
    )?;
    Ok(())
}

/// OpenAI messages → chat-template messages: text only; tools and images are refused by name.
/// `prefix` is the path of the list's owner in error params (`examples[3].` for training data).
pub fn convert_messages(
    messages: &[ChatMessageIn],
    prefix: &str,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            format!("{prefix}messages"),
            format!("`{prefix}messages` must hold at least one message"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| {
            let role = match message.role.as_str() {
                // OpenAI's newer name for system instructions.
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                "tool" | "function" => {
                    return Err(ApiError::unsupported(
                        &format!("{prefix}messages[{i}].role"),
                        "tool results need tool calling, which is not implemented",
                    ))
                }
                other => {
                    return Err(ApiError::invalid(
                        format!("{prefix}messages[{i}].role"),
                        format!("`{prefix}messages[{i}].role` is `{other}`; use system, developer, user or assistant"),
                    ))
                }
            };
            if message.tool_calls.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    &format!("{prefix}messages[{i}].tool_calls"),
                    "tool calling is not implemented",
                ));
            }
            if message.function_call.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(ApiError::unsupported(
                    &format!("{prefix}messages[{i}].function_call"),
                    "function calling is not implemented",
                ));
            }
            let content = match &message.content {
                Some(MessageContent::Text(text)) => text.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.kind.as_str(), &part.text) {
                            ("text", Some(t)) => text.push_str(t),
                            ("text", None) => {
                                return Err(ApiError::invalid(
                                    format!("{prefix}messages[{i}].content[{j}].text"),
                                    format!("text part `{prefix}messages[{i}].content[{j}]` has no `text`"),
                                ))
                            }
                            (other, _) => {
                                return Err(ApiError::unsupported(
                                    &format!("{prefix}messages[{i}].content[{j}].type"),
                                    &format!("`{other}` content parts are not implemented; this model reads text only"),
                                ))
                            }
                        }
                    }
                    text
                }
                None => {
                    return Err(ApiError::invalid(
                        format!("{prefix}messages[{i}].content"),
                        format!("`{prefix}messages[{i}].content` is missing; give the message's text"),
                    ))
                }
            };
            Ok(ChatMessage {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}
