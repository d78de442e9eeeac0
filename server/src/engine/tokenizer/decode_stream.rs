//! Streaming decoding: generated tokens become text as they come, holding back the bytes of a
//! character split across tokens so that a stream never emits half a UTF-8 character.

use super::Tokenizer;

/// Turns a stream of token ids into text that only ever contains whole characters: bytes of a
/// UTF-8 character split across tokens (emoji, CJK) are held back until it is complete.
#[derive(Debug, Default, Clone)]
pub struct DecodeStream {
    pending: Vec<u8>,
}

impl DecodeStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds token `id`; returns the text completed by it, if any. Bytes that can never become
    /// valid UTF-8 are emitted as U+FFFD, as [`Tokenizer::decode`] does.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Option<String> {
        self.pending.extend_from_slice(tok.token_bytes(id));
        let mut text = String::new();
        let mut consumed = 0;
        while consumed < self.pending.len() {
            match std::str::from_utf8(&self.pending[consumed..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    consumed = self.pending.len();
                }
                Err(e) => {
                    let valid_end = consumed + e.valid_up_to();
                    text.push_str(&String::from_utf8_lossy(&self.pending[consumed..valid_end]));
                    consumed = valid_end;
                    match e.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            consumed += invalid;
                        }
                        // An incomplete character at the end: wait for the next token.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..consumed);
        (!text.is_empty()).then_some(text)
    }

    /// Ends the stream: whatever incomplete character is left, rendered lossily.
    pub fn flush(&mut self) -> Option<String> {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        (!rest.is_empty()).then_some(rest)
    }
}
