//! The Hugging Face tokenizer path (`tokenizer.json`, `tokenizer_config.json`,
//! `chat_template.jinja`) gives llama.cpp's ids too. The directory is SmolLM2's tokenizer as
//! transformers exports it (`tests/reference/hf_tokenizer.py`); the expected ids and chat
//! renderings are the llama.cpp / jinja2 ones of `smollm2_tokenizer.json`.

mod common;

use serde::Deserialize;
use shoal_model_shards::chat_template::{ChatMessage, ChatTemplate};
use shoal_model_shards::tokenizer::Tokenizer;

#[derive(Deserialize)]
struct Fixture {
    corpus: Vec<Entry>,
    chat_renders: Vec<Render>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    text: String,
    ids: Vec<u32>,
}

#[derive(Deserialize)]
struct Render {
    messages: Vec<ChatMessage>,
    add_generation_prompt: bool,
    rendered: String,
}

#[test]
fn hf_directory_tokenizer_matches_llama_cpp() -> anyhow::Result<()> {
    let dir = common::fixture("hf_tokenizer/smollm2");
    let fixture: Fixture =
        serde_json::from_slice(&std::fs::read(common::fixture("golden/smollm2_tokenizer.json"))?)?;
    let tok = Tokenizer::from_hf_dir(&dir)?;
    for e in &fixture.corpus {
        assert_eq!(tok.encode(&e.text, false)?, e.ids, "{}", e.name);
        assert_eq!(tok.decode(&e.ids)?, e.text, "{}", e.name);
    }
    let template = ChatTemplate::from_hf_dir(&dir)?.expect("the directory has a chat template");
    for r in &fixture.chat_renders {
        assert_eq!(template.render(&r.messages, r.add_generation_prompt)?, r.rendered);
    }
    Ok(())
}
