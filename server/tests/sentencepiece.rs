//! SentencePiece tokenization on a real vocabulary: Gemma 3's (262,144 tokens, byte fallback,
//! no space prefix), against the token ids of `tests/fixtures/gemma3_270m_golden.json`, which HF
//! transformers produced and llama.cpp's own tokenizer reproduces.

mod common;

use mezo_server::engine::gguf::GgufFile;
use mezo_server::engine::tokenizer::Tokenizer;

fn gemma_tokenizer() -> Tokenizer {
    let path = common::gemma_model_path();
    let file = GgufFile::open(&path).expect("open Gemma 3");
    Tokenizer::from_gguf(&file.metadata()).expect("Gemma 3's tokenizer")
}

#[test]
fn gemma_token_ids_match_the_reference_exactly() {
    let tokenizer = gemma_tokenizer();
    assert!(tokenizer.adds_bos());
    let bos = tokenizer.bos_id().expect("Gemma has BOS");
    let golden = common::gemma_golden();
    let cases = golden["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 6);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        // A prompt gets the BOS the model expects, as the reference's ids have it.
        let ids = tokenizer.encode_prompt(text);
        let want = common::ids_of(case, "ids");
        assert_eq!(ids, want, "{text:?}");
        assert_eq!(ids[0], bos);
        assert_eq!(tokenizer.decode(&ids[1..]), text, "decoding {text:?}");
        // A prompt that writes BOS itself (as chat templates do) does not get a second one.
        assert_eq!(tokenizer.encode_prompt(&format!("<bos>{text}")), want);
    }
}
