//! The model's tokenizer: GPT-2 style byte-level BPE built from a GGUF file's
//! `tokenizer.ggml.*` metadata, reproducing llama.cpp's tokenization so that prompts get exactly
//! the ids the model was evaluated with: special tokens are cut out of the text first (here),
//! the rest is split into words by the model's pre-tokenizer regexes (`pre_tokenizer.rs`), and
//! each word is merged in rank order (`bpe.rs`). Decoding is here too, and a streaming decoder
//! that only emits whole UTF-8 characters ([`DecodeStream`]).

mod bpe;
mod decode_stream;
mod pre_tokenizer;
mod sentencepiece;

use std::cmp::Reverse;
use std::collections::HashMap;
use std::fmt;

use candle_core::quantized::gguf_file::Value;

use super::gguf::Metadata;
use super::{EngineError, Result};
use bpe::{byte_to_unicode, read_merges, Bpe};
pub use decode_stream::DecodeStream;
use pre_tokenizer::pre_tokenization;
use sentencepiece::SentencePiece;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";
const KEY_ADD_BOS: &str = "tokenizer.ggml.add_bos_token";

/// Marks a byte whose symbol is missing from the vocabulary. SmolLM2's vocabulary lacks 21
/// bytes (0xC0, 0xC1, 0xF5..0xFF never occur in UTF-8; a few control characters and the lead
/// bytes 0xF1, 0xF2 were simply never seen). No merge mentions such a symbol, and llama.cpp and
/// HF (without an unknown token) both drop it from the output, so this tokenizer does too.
const NO_TOKEN: u32 = u32::MAX;

/// Token texts that end a generation turn in the chat formats this engine meets.
const END_OF_TURN_TEXTS: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>"];

/// What a token is, from `tokenizer.ggml.token_type` (llama.cpp's numbering).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TokenKind {
    /// Type 1: ordinary vocabulary stored in the byte-level alphabet.
    Normal,
    /// Types 2 (unknown) and 3 (control): matched in text only when asked to parse specials.
    Control,
    /// Type 4: added tokens that llama.cpp (like HF) matches in text even without
    /// `parse_special`.
    UserDefined,
    /// Type 6: SentencePiece's `<0xXX>`, the byte it names.
    Byte,
    /// Type 5 (unused): plain vocabulary entries decoded as their literal text.
    Other,
}

impl TokenKind {
    fn from_type(t: i64) -> Self {
        match t {
            1 => Self::Normal,
            2 | 3 => Self::Control,
            4 => Self::UserDefined,
            6 => Self::Byte,
            _ => Self::Other,
        }
    }
}

/// How text between special tokens becomes tokens.
#[derive(Clone)]
enum Model {
    /// `gpt2`: byte-level BPE after regex pre-tokenization (GPT-2, SmolLM, Llama 3, Qwen).
    Bpe(Bpe),
    /// `llama`: SentencePiece (Llama 2, Gemma).
    SentencePiece(SentencePiece),
}

/// A token that is cut out of the text verbatim before pre-tokenization.
#[derive(Clone, Copy)]
struct Literal {
    id: u32,
    needs_parse_special: bool,
}

/// A piece of the input after special-token partitioning.
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// A tokenizer for one model's vocabulary: byte-level BPE or SentencePiece.
#[derive(Clone)]
pub struct Tokenizer {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    /// The bytes of every token, concatenated: token `i` is `bytes[offsets[i]..offsets[i + 1]]`.
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    ids: HashMap<String, u32>,
    model: Model,
    /// Tokens matched verbatim in text, longest first as llama.cpp does.
    literals: Vec<Literal>,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether the model expects BOS in front of its input (`tokenizer.ggml.add_bos_token`).
    add_bos: bool,
}

impl fmt::Debug for Tokenizer {
    // The vocabulary and merges are tens of thousands of entries; show what identifies it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let model = match &self.model {
            Model::Bpe(bpe) => format!("bpe ({} merges, pre {})", bpe.merges.len(), bpe.pre_name),
            Model::SentencePiece(_) => "sentencepiece".to_string(),
        };
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.tokens.len())
            .field("model", &model)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata: `tokenizer.ggml.model` `gpt2` (byte-level BPE)
    /// or `llama` (SentencePiece).
    pub fn from_gguf(meta: &Metadata) -> Result<Tokenizer> {
        let model_name = meta.string(KEY_MODEL)?.to_string();
        if model_name != "gpt2" && model_name != "llama" {
            return Err(EngineError::Tokenizer(format!(
                "`{KEY_MODEL}` is `{model_name}`, but this engine implements the byte-level BPE \
                 tokenizer `gpt2` (GPT-2, SmolLM, Llama 3, Qwen families) and SentencePiece \
                 `llama` (Llama 2, Gemma) only"
            )));
        }
        let tokens = meta
            .array(KEY_TOKENS)?
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(EngineError::Metadata {
                    key: KEY_TOKENS.into(),
                    reason: format!("entry {i} is {other:?}, not a string"),
                }),
            })
            .collect::<Result<Vec<String>>>()?;
        if tokens.is_empty() || u32::try_from(tokens.len()).is_err() {
            return Err(EngineError::Metadata {
                key: KEY_TOKENS.into(),
                reason: format!("{} tokens is not a usable vocabulary size", tokens.len()),
            });
        }
        let kinds = read_kinds(meta, tokens.len())?;

        let mut ids = HashMap::with_capacity(tokens.len());
        for (i, text) in tokens.iter().enumerate() {
            // Duplicate texts resolve to the last id, as in llama.cpp.
            ids.insert(text.clone(), to_id(i));
        }
        let model = if model_name == "gpt2" {
            Model::Bpe(bpe_model(meta, &ids)?)
        } else {
            Model::SentencePiece(SentencePiece::from_gguf(meta, &tokens, &kinds)?)
        };

        let mut bytes = Vec::new();
        let mut offsets = Vec::with_capacity(tokens.len() + 1);
        offsets.push(0);
        let char_to_byte: HashMap<char, u8> = byte_to_unicode()
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, u8::try_from(b).expect("256 entries index bytes")))
            .collect();
        for (text, kind) in tokens.iter().zip(&kinds) {
            match (&model, kind) {
                (Model::Bpe(_), TokenKind::Normal) => {
                    // A character outside the byte-level alphabet cannot come from the GPT-2
                    // mapping; keeping its UTF-8 bytes is the only faithful rendering.
                    for c in text.chars() {
                        match char_to_byte.get(&c) {
                            Some(b) => bytes.push(*b),
                            None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
                (Model::SentencePiece(_), TokenKind::Normal) => {
                    bytes.extend(text.replace(sentencepiece::SPACE, " ").bytes());
                }
                (Model::SentencePiece(_), TokenKind::Byte) => match sentencepiece::byte_of(text) {
                    Some(byte) => bytes.push(byte),
                    None => bytes.extend_from_slice(text.as_bytes()),
                },
                _ => bytes.extend_from_slice(text.as_bytes()),
            }
            offsets.push(bytes.len());
        }

        let mut literals: Vec<Literal> = kinds
            .iter()
            .enumerate()
            .filter(|(i, _)| !tokens[*i].is_empty())
            .filter_map(|(i, kind)| match kind {
                TokenKind::Control => Some(Literal {
                    id: to_id(i),
                    needs_parse_special: true,
                }),
                TokenKind::UserDefined => Some(Literal {
                    id: to_id(i),
                    needs_parse_special: false,
                }),
                TokenKind::Normal | TokenKind::Byte | TokenKind::Other => None,
            })
            .collect();
        // Longest first, so that a special token containing another one wins.
        literals.sort_by_key(|l| (Reverse(tokens[l.id as usize].len()), l.id));

        let bos = optional_id(meta, KEY_BOS, tokens.len())?;
        let eos = optional_id(meta, KEY_EOS, tokens.len())?;
        let add_bos = match meta.get(KEY_ADD_BOS) {
            Some(Value::Bool(add)) => *add && bos.is_some(),
            // llama.cpp's defaults: SentencePiece vocabularies start with BOS, BPE ones as their
            // pre-tokenizer says (Llama 3's do).
            _ => {
                let default = match &model {
                    Model::SentencePiece(_) => true,
                    Model::Bpe(bpe) => bpe.add_bos,
                };
                default && bos.is_some()
            }
        };

        Ok(Tokenizer {
            tokens,
            kinds,
            bytes,
            offsets,
            ids,
            model,
            literals,
            bos,
            eos,
            add_bos,
        })
    }

    /// Whether the model expects BOS in front of its input (`tokenizer.ggml.add_bos_token`).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// The tokens of a prompt, as llama.cpp builds them: special tokens written in the text are
    /// parsed, and BOS goes in front when the model expects it and the text does not already
    /// start with it (a chat template that writes `<bos>` itself).
    pub fn encode_prompt(&self, text: &str) -> Vec<u32> {
        let mut tokens = self.encode(text, true);
        if let Some(bos) = self.bos.filter(|_| self.add_bos) {
            if tokens.first() != Some(&bos) {
                tokens.insert(0, bos);
            }
        }
        tokens
    }

    /// Tokenizes `text`; no BOS is added. With `parse_special`, control tokens written in the
    /// text (`<|im_start|>`) become their single id; without it they are tokenized as text.
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        // SentencePiece puts its space prefix at the start and after each special token.
        let mut after_special = true;
        for fragment in self.partition(text, parse_special) {
            match fragment {
                Fragment::Token(id) => {
                    out.push(id);
                    after_special = true;
                }
                Fragment::Text(s) => {
                    match &self.model {
                        Model::Bpe(bpe) => {
                            for word in bpe.pre_tokenize(s) {
                                bpe.encode_word(&self.ids, word.as_bytes(), &mut out);
                            }
                        }
                        Model::SentencePiece(spm) => {
                            spm.encode(&self.ids, s, after_special, &mut out)
                        }
                    }
                    after_special = false;
                }
            }
        }
        out
    }

    /// The text of `ids`, special tokens included; invalid UTF-8 becomes U+FFFD and ids outside
    /// the vocabulary contribute nothing.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            bytes.extend_from_slice(self.token_bytes(id));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The raw bytes token `id` stands for (empty for an id outside the vocabulary). A token may
    /// hold part of a UTF-8 character, hence bytes rather than text.
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.bytes[start..end],
            _ => &[],
        }
    }

    /// The vocabulary entry as stored in the GGUF file (byte-level alphabet for normal tokens);
    /// empty for an id outside the vocabulary.
    pub fn token_text(&self, id: u32) -> &str {
        self.tokens.get(id as usize).map_or("", String::as_str)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The id whose vocabulary entry is exactly `text` (as stored, see [`Self::token_text`]).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// Whether `id` is a control, unknown or user-defined token rather than ordinary text.
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.kinds.get(id as usize),
            Some(TokenKind::Control | TokenKind::UserDefined)
        )
    }

    /// Whether `id` is a control (or unknown) token: a chat format's marker such as
    /// `<|im_start|>`, which generated text leaves out (as llama.cpp's server and vLLM do by
    /// default), unlike a user-defined token, which is text.
    pub fn is_control(&self, id: u32) -> bool {
        matches!(self.kinds.get(id as usize), Some(TokenKind::Control))
    }

    /// Ids that end a generation: EOS plus the end-of-turn tokens of common chat formats that
    /// this vocabulary has (chat models often end a turn with a token other than EOS).
    pub fn eog_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .eos
            .into_iter()
            .chain(END_OF_TURN_TEXTS.iter().filter_map(|t| self.token_id(t)))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Cuts the literal tokens out of `text` the way llama.cpp does: each literal in turn
    /// (longest first) splits every remaining text fragment at all of its occurrences.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut fragments = vec![Fragment::Text(text)];
        for literal in &self.literals {
            if literal.needs_parse_special && !parse_special {
                continue;
            }
            let pattern = self.token_text(literal.id);
            let occurs = fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(s) if s.contains(pattern)));
            if !occurs {
                continue;
            }
            let mut split = Vec::with_capacity(fragments.len() + 2);
            for fragment in fragments {
                let Fragment::Text(mut rest) = fragment else {
                    split.push(fragment);
                    continue;
                };
                while let Some(at) = rest.find(pattern) {
                    if at > 0 {
                        split.push(Fragment::Text(&rest[..at]));
                    }
                    split.push(Fragment::Token(literal.id));
                    rest = &rest[at + pattern.len()..];
                }
                if !rest.is_empty() {
                    split.push(Fragment::Text(rest));
                }
            }
            fragments = split;
        }
        fragments
    }
}

/// The BPE model of a `gpt2` vocabulary: its pre-tokenizer, merges and byte tokens.
fn bpe_model(meta: &Metadata, ids: &HashMap<String, u32>) -> Result<Bpe> {
    let pre_name = match meta.get(KEY_PRE) {
        Some(_) => meta.string(KEY_PRE)?.to_string(),
        None => {
            // Older converters did not record the pre-tokenizer; GPT-2's is what the model
            // name `gpt2` implies.
            tracing::warn!("`{KEY_PRE}` is missing; pre-tokenizing with the GPT-2 regex");
            "gpt-2".to_string()
        }
    };
    let pre = pre_tokenization(&pre_name)?;
    let alphabet = Box::new(byte_to_unicode());
    let mut byte_tokens = [NO_TOKEN; 256];
    for (slot, c) in byte_tokens.iter_mut().zip(alphabet.iter()) {
        if let Some(&id) = ids.get(c.to_string().as_str()) {
            *slot = id;
        }
    }
    let missing = byte_tokens.iter().filter(|&&t| t == NO_TOKEN).count();
    if missing > 0 {
        tracing::debug!("{missing} of 256 bytes have no token; text bytes among them are dropped");
    }
    Ok(Bpe {
        merges: read_merges(meta, ids)?,
        byte_tokens,
        pre_name,
        pre_regexes: pre.regexes,
        ignore_merges: pre.ignore_merges,
        alphabet,
        add_bos: pre.add_bos,
    })
}

fn to_id(index: usize) -> u32 {
    u32::try_from(index).expect("the vocabulary size was checked to fit u32")
}

/// Token kinds from `tokenizer.ggml.token_type`; without the key every token is normal, as in
/// llama.cpp.
fn read_kinds(meta: &Metadata, n_tokens: usize) -> Result<Vec<TokenKind>> {
    if meta.get(KEY_TOKEN_TYPE).is_none() {
        return Ok(vec![TokenKind::Normal; n_tokens]);
    }
    let types = meta.array(KEY_TOKEN_TYPE)?;
    if types.len() != n_tokens {
        return Err(EngineError::Metadata {
            key: KEY_TOKEN_TYPE.into(),
            reason: format!("{} entries for {n_tokens} tokens", types.len()),
        });
    }
    types
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let t = match v {
                Value::I32(t) => i64::from(*t),
                Value::U32(t) => i64::from(*t),
                Value::I8(t) => i64::from(*t),
                Value::U8(t) => i64::from(*t),
                other => {
                    return Err(EngineError::Metadata {
                        key: KEY_TOKEN_TYPE.into(),
                        reason: format!("entry {i} is {other:?}, not an integer"),
                    })
                }
            };
            Ok(TokenKind::from_type(t))
        })
        .collect()
}

/// An id key that may be absent; present, it must name a token.
fn optional_id(meta: &Metadata, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    if meta.get(key).is_none() {
        return Ok(None);
    }
    let id = meta.usize(key)?;
    if id >= n_tokens {
        return Err(EngineError::Metadata {
            key: key.into(),
            reason: format!("token id {id} is outside the vocabulary of {n_tokens} tokens"),
        });
    }
    Ok(Some(to_id(id)))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    use candle_core::quantized::gguf_file::{Content, Value, VersionedMagic};

    use super::*;
    use crate::engine::gguf::GgufFile;

    /// The real model: `MEZO_MODEL`, or the default file that `mezo fetch-model` writes.
    pub(crate) fn model_path() -> PathBuf {
        let path = std::env::var_os("MEZO_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("../models/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        assert!(
            path.exists(),
            "{} is missing: run `mezo fetch-model` (`cargo run -p mezo-server -- fetch-model`) \
             or set MEZO_MODEL",
            path.display()
        );
        path
    }

    /// The real model's GGUF header, parsed once for all tests.
    pub(crate) fn model_gguf() -> &'static GgufFile {
        static FILE: OnceLock<GgufFile> = OnceLock::new();
        FILE.get_or_init(|| GgufFile::open(&model_path()).expect("open the model's GGUF header"))
    }

    pub(crate) fn golden_cases() -> Vec<serde_json::Value> {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2_golden.json");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read the golden fixture {}: {e}", path.display()));
        let golden: serde_json::Value =
            serde_json::from_str(&text).expect("the golden fixture is JSON");
        let cases = golden["cases"].as_array().expect("the fixture has `cases`");
        assert!(!cases.is_empty(), "the golden fixture has no cases");
        cases.clone()
    }

    pub(crate) fn ids_of(case: &serde_json::Value) -> Vec<u32> {
        case["ids"]
            .as_array()
            .expect("case has `ids`")
            .iter()
            .map(|v| u32::try_from(v.as_u64().expect("token id")).expect("id fits u32"))
            .collect()
    }

    /// The BPE token of byte `b` (or `NO_TOKEN`).
    fn byte_token(tok: &Tokenizer, b: usize) -> u32 {
        match &tok.model {
            Model::Bpe(bpe) => bpe.byte_tokens[b],
            Model::SentencePiece(_) => panic!("a BPE vocabulary was expected"),
        }
    }

    fn smollm() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            Tokenizer::from_gguf(&model_gguf().metadata()).expect("build the SmolLM2 tokenizer")
        })
    }

    fn strings(items: &[&str]) -> Value {
        Value::Array(items.iter().map(|s| Value::String(s.to_string())).collect())
    }

    /// A tiny byte-level vocabulary: the 256 byte symbols, then `extra` tokens (merge results
    /// and specials, whose types are given), built with `merges` and pre-tokenizer `pre`.
    fn synthetic(
        model: &str,
        pre: &str,
        extra: &[(&str, i32)],
        merges: &[&str],
    ) -> Result<Tokenizer> {
        let mut tokens: Vec<String> = byte_to_unicode().iter().map(char::to_string).collect();
        let mut types = vec![1; 256];
        for (text, t) in extra {
            tokens.push(text.to_string());
            types.push(*t);
        }
        let mut metadata = vocabulary(model, tokens, types);
        metadata.insert(KEY_PRE.to_string(), Value::String(pre.into()));
        metadata.insert(KEY_MERGES.to_string(), strings(merges));
        tokenizer_of(metadata)
    }

    /// The metadata of a vocabulary of `tokens` of `types` for tokenizer model `model`.
    fn vocabulary(model: &str, tokens: Vec<String>, types: Vec<i32>) -> HashMap<String, Value> {
        let mut metadata = HashMap::new();
        metadata.insert(KEY_MODEL.to_string(), Value::String(model.into()));
        metadata.insert(
            KEY_TOKENS.to_string(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        );
        metadata.insert(
            KEY_TOKEN_TYPE.to_string(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        );
        metadata
    }

    fn tokenizer_of(metadata: HashMap<String, Value>) -> Result<Tokenizer> {
        let content = Content {
            magic: VersionedMagic::GgufV3,
            metadata,
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        Tokenizer::from_gguf(&Metadata::new(&content))
    }

    #[test]
    fn prompts_get_bos_only_when_the_model_expects_it() {
        // SmolLM2's file says `add_bos_token = false`.
        let tok = smollm();
        assert!(!tok.adds_bos());
        assert_eq!(tok.encode_prompt("Hello"), tok.encode("Hello", true));
    }

    #[test]
    fn text_cases_match_llama_cpp_ids() {
        let tok = smollm();
        let mut checked = 0;
        for case in golden_cases().iter().filter(|c| c["kind"] == "text") {
            let text = case["text"].as_str().expect("text case has `text`");
            assert_eq!(tok.encode(text, true), ids_of(case), "ids of {text:?}");
            checked += 1;
        }
        assert!(checked > 0, "the fixture has no text cases");
    }

    #[test]
    fn rendered_chat_cases_match_llama_cpp_ids() {
        let tok = smollm();
        let mut checked = 0;
        for case in golden_cases().iter().filter(|c| c["kind"] == "chat") {
            let rendered = case["rendered"].as_str().expect("chat case has `rendered`");
            assert_eq!(
                tok.encode(rendered, true),
                ids_of(case),
                "ids of {rendered:?}"
            );
            checked += 1;
        }
        assert!(checked > 0, "the fixture has no chat cases");
    }

    #[test]
    fn decode_inverts_encode_on_fixture_texts() {
        let tok = smollm();
        for case in golden_cases() {
            let text = case["text"]
                .as_str()
                .or_else(|| case["rendered"].as_str())
                .expect("every case has `text` or `rendered`");
            assert_eq!(tok.decode(&tok.encode(text, true)), text);
            assert_eq!(tok.decode(&ids_of(&case)), text);
        }
    }

    #[test]
    fn decode_stream_holds_back_partial_characters() {
        let tok = smollm();
        let text = golden_cases()
            .iter()
            .filter_map(|c| c["text"].as_str().map(str::to_string))
            .find(|t| t.contains('🎉'))
            .expect("the fixture has the emoji case");
        let ids = tok.encode(&text, true);
        // The emoji's four bytes must be spread over several tokens for this test to bite.
        assert!(
            ids.iter()
                .any(|&id| std::str::from_utf8(tok.token_bytes(id)).is_err()),
            "no token of {text:?} splits a character"
        );
        let mut stream = DecodeStream::new();
        let mut streamed = String::new();
        for &id in &ids {
            if let Some(piece) = stream.push(tok, id) {
                assert!(
                    !piece.contains(char::REPLACEMENT_CHARACTER),
                    "partial character in {piece:?}"
                );
                streamed.push_str(&piece);
            }
        }
        assert_eq!(stream.flush(), None);
        assert_eq!(streamed, text);
    }

    #[test]
    fn decode_stream_flushes_an_incomplete_character_lossily() {
        let tok = smollm();
        let mut stream = DecodeStream::new();
        let first_byte = byte_token(tok, 0xF0);
        assert_ne!(first_byte, NO_TOKEN);
        assert_eq!(stream.push(tok, first_byte), None);
        // An ASCII byte cannot continue the sequence: the lead byte becomes U+FFFD.
        assert_eq!(
            stream
                .push(tok, byte_token(tok, usize::from(b'a')))
                .as_deref(),
            Some("\u{FFFD}a")
        );
        assert_eq!(stream.push(tok, first_byte), None);
        assert_eq!(stream.flush().as_deref(), Some("\u{FFFD}"));
        assert_eq!(stream.flush(), None);
    }

    #[test]
    fn smollm_metadata_is_read() {
        let tok = smollm();
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.bos_id(), Some(1));
        assert_eq!(tok.eos_id(), Some(2));
        assert_eq!(tok.token_text(1), "<|im_start|>");
        assert_eq!(tok.token_id("<|im_end|>"), Some(2));
        assert!(tok.is_special(1));
        assert!(!tok.is_special(byte_token(tok, usize::from(b'a'))));
        assert!(tok.is_control(1));
        assert!(!tok.is_control(byte_token(tok, usize::from(b'a'))));
        // <|endoftext|> (0) and <|im_end|> (2, also EOS).
        assert_eq!(tok.eog_ids(), vec![0, 2]);
        // "Ġthe" is stored in the byte-level alphabet but stands for " the".
        let the = tok.token_id("Ġthe").expect("`Ġthe` is in the vocabulary");
        assert_eq!(tok.token_bytes(the), b" the");
        assert_eq!(tok.token_bytes(1), b"<|im_start|>");
    }

    #[test]
    fn out_of_range_ids_do_not_panic() {
        let tok = smollm();
        let beyond = u32::try_from(tok.vocab_size()).expect("vocab fits u32");
        assert_eq!(tok.token_bytes(beyond), b"");
        assert_eq!(tok.token_bytes(u32::MAX), b"");
        assert_eq!(tok.token_text(u32::MAX), "");
        assert!(!tok.is_special(u32::MAX));
        assert!(!tok.is_control(u32::MAX));
        let hi = tok.encode("hi", false);
        assert_eq!(tok.decode(&[hi[0], u32::MAX, beyond]), tok.decode(&hi[..1]));
        let mut stream = DecodeStream::new();
        assert_eq!(stream.push(tok, u32::MAX), None);
    }

    #[test]
    fn special_tokens_are_text_unless_parse_special() {
        let tok = smollm();
        let text = "<|im_start|>user";
        let parsed = tok.encode(text, true);
        assert_eq!(parsed[0], 1);
        let literal = tok.encode(text, false);
        assert!(
            !literal.contains(&1),
            "special token parsed without parse_special: {literal:?}"
        );
        assert!(literal.len() > parsed.len());
        assert_eq!(tok.decode(&literal), text);
    }

    #[test]
    fn bytes_without_a_token_are_dropped() {
        let tok = smollm();
        assert_eq!(byte_token(tok, 0x04), NO_TOKEN);
        let a = tok.token_id("a").expect("a");
        let b = tok.token_id("b").expect("b");
        assert_eq!(tok.encode("a\u{4}b", false), vec![a, b]);
    }

    #[test]
    fn empty_text_has_no_tokens() {
        assert!(smollm().encode("", true).is_empty());
    }

    #[test]
    fn unknown_tokenizer_model_is_rejected() {
        let err = synthetic("bert", "default", &[], &[]).expect_err("WordPiece is not supported");
        let message = err.to_string();
        assert!(
            message.contains("`bert`") && message.contains("`gpt2`") && message.contains("`llama`"),
            "{message}"
        );
        assert!(matches!(err, EngineError::Tokenizer(_)));
    }

    /// A SentencePiece vocabulary: `(text, score, type)` after `<unk>`, `<s>`, `</s>` and the
    /// 256 byte tokens.
    fn sentencepiece(pieces: &[(&str, f32, i32)], add_space_prefix: bool) -> Tokenizer {
        let mut tokens = vec!["<unk>".to_string(), "<s>".into(), "</s>".into()];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0f32; 3];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
        for (text, score, t) in pieces {
            tokens.push(text.to_string());
            types.push(*t);
            scores.push(*score);
        }
        let mut metadata = vocabulary("llama", tokens, types);
        metadata.insert(
            "tokenizer.ggml.scores".to_string(),
            Value::Array(scores.into_iter().map(Value::F32).collect()),
        );
        metadata.insert(KEY_BOS.to_string(), Value::U32(1));
        metadata.insert(
            "tokenizer.ggml.add_space_prefix".to_string(),
            Value::Bool(add_space_prefix),
        );
        tokenizer_of(metadata).expect("a SentencePiece vocabulary")
    }

    #[test]
    fn sentencepiece_merges_the_best_scoring_pair_first_and_falls_back_to_bytes() {
        // Ids: 259 = "a", 260 = "b", 261 = "▁", 262 = "ab", 263 = "▁a", 264 = "▁ab", 265 = "<sep>".
        let tok = sentencepiece(
            &[
                ("a", -1.0, 1),
                ("b", -1.0, 1),
                ("\u{2581}", -1.0, 1),
                ("ab", -3.0, 1),
                ("\u{2581}a", -2.0, 1),
                ("\u{2581}ab", -5.0, 1),
                ("<sep>", 0.0, 4),
            ],
            true,
        );
        assert!(
            tok.adds_bos(),
            "SentencePiece starts with BOS unless told otherwise"
        );
        // "▁a" outscores "ab", then "▁a" + "b" is a token too: "▁ab".
        assert_eq!(tok.encode("ab", false), [264]);
        // A special token (here user-defined, matched even without `parse_special`) is followed
        // by the space prefix too.
        assert_eq!(tok.encode("<sep>ab", false), [265, 264]);
        assert_eq!(tok.encode("b a", false), [261, 260, 263]);
        // Without the prefix, "ab" is the best pair; "é" is not a token: its two byte tokens.
        let tok = sentencepiece(&[("a", -1.0, 1), ("b", -1.0, 1), ("ab", -3.0, 1)], false);
        assert_eq!(tok.encode("abé", false), [261, 3 + 0xC3, 3 + 0xA9]);
        assert_eq!(tok.decode(&tok.encode("abé", false)), "abé");
        assert_eq!(tok.decode(&[3 + u32::from(b' ')]), " ");
    }

    #[test]
    fn unknown_pre_tokenizer_is_rejected() {
        let err = synthetic("gpt2", "deepseek-coder", &[], &[]).expect_err("unsupported pre");
        assert!(err.to_string().contains("`deepseek-coder`"), "{err}");
    }

    #[test]
    fn merges_follow_rank_not_position() {
        // "a b" ranks before "b c": "abc" must become "ab" + "c", never "a" + "bc".
        let tok = synthetic("gpt2", "gpt-2", &[("ab", 1), ("bc", 1)], &["a b", "b c"])
            .expect("synthetic tokenizer");
        let ab = tok.token_id("ab").expect("ab");
        let c = tok.token_id("c").expect("c");
        assert_eq!(tok.encode("abc", false), vec![ab, c]);
        let tok = synthetic("gpt2", "gpt-2", &[("ab", 1), ("bc", 1)], &["b c", "a b"])
            .expect("synthetic tokenizer");
        let a = tok.token_id("a").expect("a");
        let bc = tok.token_id("bc").expect("bc");
        assert_eq!(tok.encode("abc", false), vec![a, bc]);
    }

    #[test]
    fn smollm_family_splits_digits_and_gpt2_does_not() {
        let extra = [("12", 1)];
        let merges = ["1 2"];
        let gpt2 = synthetic("gpt2", "gpt-2", &extra, &merges).expect("gpt-2 tokenizer");
        let twelve = gpt2.token_id("12").expect("12");
        assert_eq!(gpt2.encode("12", false), vec![twelve]);
        let smollm = synthetic("gpt2", "smollm", &extra, &merges).expect("smollm tokenizer");
        assert_eq!(smollm.encode("12", false).len(), 2);
    }

    /// The words a BPE tokenizer with pre-tokenizer `pre` splits `text` into.
    fn words(pre: &str, text: &str) -> Vec<String> {
        let tok = synthetic("gpt2", pre, &[], &[]).expect("a tokenizer");
        let Model::Bpe(bpe) = &tok.model else {
            panic!("a BPE vocabulary was expected")
        };
        bpe.pre_tokenize(text)
            .into_iter()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn llama3_and_qwen2_split_words_as_llama_cpp_does() {
        let text = "I'LL pay 12345 dollars!!\n\n  ok";
        let llama3 = [
            "I", "'LL", " pay", " ", "123", "45", " dollars", "!!\n\n", " ", " ok",
        ];
        for pre in ["llama-bpe", "llama3", "falcon3"] {
            assert_eq!(words(pre, text), llama3, "{pre}");
        }
        let qwen2 = [
            "I", "'LL", " pay", " ", "1", "2", "3", "4", "5", " dollars", "!!\n\n", " ", " ok",
        ];
        assert_eq!(words("qwen2", text), qwen2);
    }

    #[test]
    fn llama3_takes_a_whole_word_token_without_merging() {
        // No merge leads to "hello", but the vocabulary has it: Llama 3 uses it as it is.
        let extra = [("hello", 1)];
        let llama3 = synthetic("gpt2", "llama-bpe", &extra, &[]).expect("llama-bpe tokenizer");
        let hello = llama3.token_id("hello").expect("hello");
        assert_eq!(llama3.encode("hello", false), vec![hello]);
        let smollm = synthetic("gpt2", "smollm", &extra, &[]).expect("smollm tokenizer");
        assert_eq!(smollm.encode("hello", false).len(), 5);
    }

    #[test]
    fn user_defined_tokens_match_without_parse_special_and_longest_first() {
        let extra = [("<a>", 4), ("<a><b>", 3)];
        let tok = synthetic("gpt2", "gpt-2", &extra, &[]).expect("synthetic tokenizer");
        let a = tok.token_id("<a>").expect("<a>");
        let ab = tok.token_id("<a><b>").expect("<a><b>");
        assert_eq!(tok.encode("<a><b>", true), vec![ab]);
        let without = tok.encode("<a><b>", false);
        assert_eq!(without[0], a);
        assert!(!without.contains(&ab));
        assert_eq!(tok.decode(&without), "<a><b>");
    }
}
