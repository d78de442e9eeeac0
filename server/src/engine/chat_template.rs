//! Rendering chat messages into the prompt text a chat model was trained on, using the Jinja
//! template stored in its GGUF file (`tokenizer.chat_template`) with the environment Hugging
//! Face transformers gives such templates, so prompts match what HF would build byte for byte.

use std::path::Path;

use minijinja::{context, Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use super::gguf::Metadata;
use super::{EngineError, Result};

const KEY_TEMPLATE: &str = "tokenizer.chat_template";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// The name the one template is registered under in its environment.
const TEMPLATE_NAME: &str = "chat";

/// One chat turn, as in the OpenAI and HF APIs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// A compiled chat template plus the BOS/EOS texts templates may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// The model's own template; `None` when the file has none (a base model, which serves
    /// text completions only unless a template is given, [`Self::from_file`]).
    pub fn from_gguf(meta: &Metadata) -> Result<Option<ChatTemplate>> {
        if meta.get(KEY_TEMPLATE).is_none() {
            return Ok(None);
        }
        let source = meta.string(KEY_TEMPLATE)?.to_string();
        Self::with_tokens_of(meta, source).map(Some)
    }

    /// The Jinja template in the file at `path` (`--chat-template`, `[model] chat_template`),
    /// rendered with the model's BOS and EOS texts; it replaces the GGUF's own.
    pub fn from_file(path: &Path, meta: &Metadata) -> Result<ChatTemplate> {
        let source = std::fs::read_to_string(path).map_err(|e| {
            EngineError::ChatTemplate(format!(
                "cannot read the chat template {}: {e}; --chat-template takes a Jinja file \
                 such as a Hugging Face model's `chat_template` saved as text",
                path.display()
            ))
        })?;
        Self::with_tokens_of(meta, source).map_err(|e| match e {
            EngineError::ChatTemplate(reason) => {
                EngineError::ChatTemplate(format!("{}: {reason}", path.display()))
            }
            other => other,
        })
    }

    fn with_tokens_of(meta: &Metadata, source: String) -> Result<ChatTemplate> {
        let bos = token_text(meta, KEY_BOS)?;
        let eos = token_text(meta, KEY_EOS)?;
        Self::new(source, bos, eos)
    }

    /// Compiles `source`; `bos` and `eos` are the texts of `bos_token` and `eos_token`.
    pub fn new(source: String, bos: String, eos: String) -> Result<Self> {
        let mut env = Environment::new();
        // HF renders with trim_blocks and lstrip_blocks, and Jinja's default of dropping one
        // trailing newline; templates are written against exactly that whitespace handling.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        // Templates are written for Python Jinja and call str/dict methods (`.strip()`,
        // `.startswith()`, `.items()`) that minijinja itself lacks.
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source).map_err(|e| {
            EngineError::ChatTemplate(format!("the template does not compile: {}", describe(&e)))
        })?;
        Ok(Self { env, bos, eos })
    }

    /// The prompt for `messages`; with `add_generation_prompt` it ends with the header of the
    /// assistant turn the model is to write.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .expect("ChatTemplate::new registered the template");
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos,
                eos_token => &self.eos,
            })
            .map_err(|e| EngineError::ChatTemplate(format!("rendering failed: {}", describe(&e))))
    }
}

/// HF's `raise_exception(message)`: templates call it to refuse input they cannot format
/// (e.g. roles not alternating); the message is the reason users need to see.
fn raise_exception(message: String) -> std::result::Result<String, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// The error with its causes, which minijinja keeps in the source chain.
fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The text of the token whose id is stored under `key`, or "" if the key is absent (templates
/// then render `bos_token` as nothing, as HF does for a tokenizer without one).
fn token_text(meta: &Metadata, key: &str) -> Result<String> {
    if meta.get(key).is_none() {
        return Ok(String::new());
    }
    let id = meta.usize(key)?;
    let tokens = meta.array(KEY_TOKENS)?;
    match tokens.get(id).map(|v| v.to_string()) {
        Some(Ok(text)) => Ok(text.clone()),
        Some(Err(e)) => Err(EngineError::Metadata {
            key: KEY_TOKENS.into(),
            reason: format!("entry {id} (`{key}`) is not a string: {e}"),
        }),
        None => Err(EngineError::Metadata {
            key: key.into(),
            reason: format!(
                "token id {id} is outside the vocabulary of {} tokens",
                tokens.len()
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::tokenizer::tests::{golden_cases, model_gguf};

    fn messages_of(case: &serde_json::Value) -> Vec<ChatMessage> {
        serde_json::from_value(case["messages"].clone()).expect("chat case has `messages`")
    }

    fn user(content: &str) -> ChatMessage {
        ChatMessage {
            role: "user".into(),
            content: content.into(),
        }
    }

    fn template(source: &str) -> ChatTemplate {
        ChatTemplate::new(source.into(), "<s>".into(), "</s>".into()).expect("template compiles")
    }

    #[test]
    fn smollm_template_renders_fixture_chats_exactly() {
        let chat = ChatTemplate::from_gguf(&model_gguf().metadata())
            .expect("load the template")
            .expect("SmolLM2 carries a template");
        let mut checked = 0;
        for case in golden_cases().iter().filter(|c| c["kind"] == "chat") {
            let rendered = chat.render(&messages_of(case), true).expect("render");
            assert_eq!(
                rendered,
                case["rendered"].as_str().expect("chat case has `rendered`")
            );
            checked += 1;
        }
        assert!(checked > 0, "the fixture has no chat cases");
    }

    #[test]
    fn smollm_template_sees_bos_and_eos() {
        let chat = ChatTemplate::from_gguf(&model_gguf().metadata())
            .expect("load the template")
            .expect("SmolLM2 carries a template");
        assert_eq!(chat.bos, "<|im_start|>");
        assert_eq!(chat.eos, "<|im_end|>");
    }

    /// ChatML, the format of most small open chat models.
    const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn a_template_file_replaces_the_models_and_errors_name_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let meta_source = model_gguf();
        let meta = meta_source.metadata();
        let path = dir.path().join("plain.jinja");
        std::fs::write(
            &path,
            "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
        )
        .expect("write");
        let chat = ChatTemplate::from_file(&path, &meta).expect("compiles");
        assert_eq!(
            chat.render(&[user("hi")], true).expect("render"),
            "[user] hi\n"
        );
        // The model's BOS and EOS texts stay available to the template.
        assert_eq!(chat.eos, "<|im_end|>");

        let missing = dir.path().join("missing.jinja");
        let err = ChatTemplate::from_file(&missing, &meta)
            .expect_err("no file")
            .to_string();
        assert!(
            err.contains("missing.jinja") && err.contains("--chat-template"),
            "{err}"
        );
        let broken = dir.path().join("broken.jinja");
        std::fs::write(&broken, "{% for m in messages %}").expect("write");
        let err = ChatTemplate::from_file(&broken, &meta)
            .expect_err("does not compile")
            .to_string();
        assert!(
            err.contains("broken.jinja") && err.contains("does not compile"),
            "{err}"
        );
    }

    #[test]
    fn generation_prompt_is_optional() {
        let chat = template(CHATML_TEMPLATE);
        let messages = [user("hi")];
        assert_eq!(
            chat.render(&messages, false).expect("render"),
            "<|im_start|>user\nhi<|im_end|>\n"
        );
        assert_eq!(
            chat.render(&messages, true).expect("render"),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_reaches_the_error() {
        let chat = template("{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message must come first') }}{% endif %}");
        let err = chat
            .render(&[user("hi")], true)
            .expect_err("template refuses");
        assert!(matches!(err, EngineError::ChatTemplate(_)));
        assert!(
            err.to_string().contains("a system message must come first"),
            "{err}"
        );
    }

    #[test]
    fn broken_template_fails_at_load() {
        let err = ChatTemplate::new(
            "{% for m in messages %}".into(),
            String::new(),
            String::new(),
        )
        .expect_err("unclosed for loop");
        assert!(matches!(err, EngineError::ChatTemplate(_)));
        assert!(err.to_string().contains("does not compile"), "{err}");
    }

    #[test]
    fn whitespace_control_matches_hf() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before
        // it, and one trailing newline of the template is dropped.
        let chat = template("{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n");
        assert_eq!(
            chat.render(&[user("a"), user("b")], false).expect("render"),
            "[a]\n[b]\n"
        );
    }

    #[test]
    fn python_string_methods_and_special_tokens_work() {
        let chat = template("{{ bos_token }}{% for m in messages %}{{ m['content'].strip().upper() }}{% if m.content.startswith(' x') %}!{% endif %}{% endfor %}{{ eos_token }}");
        assert_eq!(
            chat.render(&[user(" xy ")], false).expect("render"),
            "<s>XY!</s>"
        );
    }

    #[test]
    fn loop_controls_are_available() {
        let chat = template("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}");
        assert_eq!(
            chat.render(&[user("a"), user("b")], false).expect("render"),
            "a"
        );
    }
}
