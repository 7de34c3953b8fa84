//! Tokenizer and chat-template parity with llama.cpp / Hugging Face for SmolLM2-135M-Instruct.
//!
//! Needs `models/SmolLM2-135M-Instruct.Q4_1.gguf` (run `deploy/fetch-model.sh`) and the golden
//! fixture `tests/fixtures/golden/smollm2_tokenizer.json` (written by
//! `tests/reference/tokenizer_reference.py` from llama.cpp and jinja2). Missing files fail the
//! tests; they are never skipped.

use std::fs::File;
use std::path::PathBuf;

use anyhow::{Context, Result, bail, ensure};
use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde_json::Value;
use shoal_model_shards::chat_template::{ChatMessage, ChatTemplate, ChatTemplateError};
use shoal_model_shards::tokenizer::{Tokenizer, TokenizerError};

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn gguf_content() -> Result<Content> {
    let path = repo_path("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        bail!("model file {} is missing: run deploy/fetch-model.sh first", path.display());
    }
    let mut file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    Content::read(&mut file).with_context(|| format!("reading GGUF metadata of {}", path.display()))
}

fn tokenizer() -> Result<Tokenizer> {
    Ok(Tokenizer::from_gguf(&gguf_content()?)?)
}

fn golden() -> Result<Value> {
    let path = repo_path("tests/fixtures/golden/smollm2_tokenizer.json");
    if !path.is_file() {
        bail!(
            "golden fixture {} is missing: run tests/reference/tokenizer_reference.py \
             (needs llama-cpp-python) and deploy/fetch-model.sh",
            path.display()
        );
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn ids_of(v: &Value) -> Result<Vec<u32>> {
    v.as_array()
        .context("expected an id array")?
        .iter()
        .map(|id| id.as_u64().and_then(|i| u32::try_from(i).ok()).context("expected a u32 id"))
        .collect()
}

fn str_of<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key).and_then(Value::as_str).with_context(|| format!("fixture field `{key}` is not a string"))
}

/// Streams `ids` through an incremental decoder; returns the chunks and the final flush.
fn stream(tok: &Tokenizer, ids: &[u32]) -> Result<(Vec<String>, String)> {
    let mut dec = tok.incremental_decoder();
    let mut chunks = Vec::new();
    for &id in ids {
        if let Some(chunk) = dec.push(id)? {
            chunks.push(chunk);
        }
    }
    let rest = dec.finish()?;
    Ok((chunks, rest))
}

#[test]
fn the_is_504_without_prefix_space() -> Result<()> {
    let tok = tokenizer()?;
    assert_eq!(tok.encode("The", false)?, vec![504]);
    assert_eq!(tok.decode(&[504])?, "The");
    Ok(())
}

#[test]
fn special_tokens_are_single_ids() -> Result<()> {
    let tok = tokenizer()?;
    let start = tok.token_to_id("<|im_start|>").context("<|im_start|> not in vocab")?;
    let end = tok.token_to_id("<|im_end|>").context("<|im_end|> not in vocab")?;
    let ids = tok.encode("<|im_start|>user\nHello<|im_end|>", false)?;
    assert_eq!(ids.first(), Some(&start));
    assert_eq!(ids.last(), Some(&end));
    assert_eq!(ids.iter().filter(|&&i| i == start || i == end).count(), 2);
    assert_eq!(tok.decode(&ids)?, "<|im_start|>user\nHello<|im_end|>");
    assert_eq!(tok.decode_with(&ids, true)?, "user\nHello");
    Ok(())
}

#[test]
fn special_ids_and_vocab() -> Result<()> {
    let tok = tokenizer()?;
    let g = golden()?;
    assert_eq!(tok.vocab_size() as u64, g["n_vocab"].as_u64().context("n_vocab")?);
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
    assert_eq!(tok.eos_ids(), &[2]);
    assert_eq!(tok.bos_token(), Some(str_of(&g, "bos_token")?));
    assert_eq!(tok.eos_token(), Some(str_of(&g, "eos_token")?));
    assert_eq!(tok.id_to_token(504).as_deref(), Some("The"));
    // SmolLM2's GGUF says add_bos_token = false.
    assert!(!tok.add_bos());
    assert_eq!(tok.encode("Hi", true)?, tok.encode("Hi", false)?);
    assert!(matches!(tok.decode(&[u32::MAX]), Err(TokenizerError::UnknownId { .. })));
    Ok(())
}

#[test]
fn corpus_ids_and_decode_match_llama_cpp() -> Result<()> {
    let tok = tokenizer()?;
    let g = golden()?;
    let corpus = g["corpus"].as_array().context("corpus")?;
    ensure!(!corpus.is_empty(), "empty corpus in fixture");
    let mut failures = Vec::new();
    for entry in corpus {
        let name = str_of(entry, "name")?;
        let text = str_of(entry, "text")?;
        let want = ids_of(&entry["ids"])?;
        let got = tok.encode(text, false)?;
        if got != want {
            failures.push(format!("{name}: ids {got:?} != llama.cpp {want:?}"));
            continue;
        }
        let decoded = tok.decode(&want)?;
        let want_text = str_of(entry, "detok_special_true")?;
        if decoded != want_text {
            failures.push(format!("{name}: decode {decoded:?} != llama.cpp {want_text:?}"));
        }
        let plain = tok.decode_with(&want, true)?;
        let want_plain = str_of(entry, "detok_special_false")?;
        if plain != want_plain {
            failures.push(format!("{name}: decode(skip special) {plain:?} != llama.cpp {want_plain:?}"));
        }
    }
    ensure!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
    Ok(())
}

#[test]
fn incremental_decoding_equals_full_decode() -> Result<()> {
    let tok = tokenizer()?;
    let g = golden()?;
    for entry in g["corpus"].as_array().context("corpus")? {
        let name = str_of(entry, "name")?;
        let ids = ids_of(&entry["ids"])?;
        let full = tok.decode(&ids)?;
        let (chunks, rest) = stream(&tok, &ids)?;
        let joined = chunks.concat() + &rest;
        ensure!(joined == full, "{name}: streamed {joined:?} != decoded {full:?}");
        if !full.contains(char::REPLACEMENT_CHARACTER) {
            ensure!(
                chunks.iter().all(|c| !c.contains(char::REPLACEMENT_CHARACTER)),
                "{name}: a chunk holds U+FFFD: {chunks:?}"
            );
            ensure!(rest.is_empty(), "{name}: text held back until finish: {rest:?}");
        }
    }
    Ok(())
}

#[test]
fn incremental_decoding_never_splits_emoji_or_cjk() -> Result<()> {
    let tok = tokenizer()?;
    let texts = [
        "👨‍👩‍👧‍👦 family",
        "Team: 👩🏽‍💻 🏳️‍🌈 ❤️‍🔥 🇫🇷🇯🇵",
        "你好，世界！我爱编程。",
        "東京は日本の首都です。カタカナ",
        "안녕하세요 세계 🍕🚀",
        "mixed: naïve 😀 中文 ∑∞",
    ];
    for text in texts {
        let ids = tok.encode(text, false)?;
        let (chunks, rest) = stream(&tok, &ids)?;
        for chunk in &chunks {
            ensure!(!chunk.contains(char::REPLACEMENT_CHARACTER), "{text:?}: chunk {chunk:?} holds U+FFFD");
        }
        ensure!(rest.is_empty(), "{text:?}: {rest:?} held back until finish");
        ensure!(chunks.concat() == text, "{text:?}: streamed {chunks:?}");
    }
    // A dangling partial character is flushed lossily by finish().
    let ids = tok.encode("🍕", false)?;
    if ids.len() > 1 {
        let mut dec = tok.incremental_decoder();
        for &id in ids.iter().take(ids.len() - 1) {
            assert_eq!(dec.push(id)?, None);
        }
        assert!(dec.finish()?.contains(char::REPLACEMENT_CHARACTER));
    }
    Ok(())
}

#[test]
fn chat_template_matches_jinja2() -> Result<()> {
    let content = gguf_content()?;
    let g = golden()?;
    let template = ChatTemplate::from_gguf(&content)?.context("GGUF has no chat template")?;
    assert_eq!(Some(template.source()), g["chat_template"].as_str());
    let tok = Tokenizer::from_gguf(&content)?;
    let via_tokenizer = ChatTemplate::for_tokenizer(&tok)?.context("tokenizer has no template")?;
    let renders = g["chat_renders"].as_array().context("chat_renders")?;
    ensure!(!renders.is_empty(), "no chat renders in fixture");
    for r in renders {
        let name = str_of(r, "name")?;
        let agp = r["add_generation_prompt"].as_bool().context("add_generation_prompt")?;
        let messages: Vec<ChatMessage> = serde_json::from_value(r["messages"].clone())?;
        let want = str_of(r, "rendered")?;
        let got = template.render(&messages, agp)?;
        ensure!(got == want, "{name} (agp={agp}): {got:?} != jinja2 {want:?}");
        ensure!(via_tokenizer.render(&messages, agp)? == want, "{name}: for_tokenizer differs");
        let ids = tok.encode(&got, false)?;
        ensure!(ids == ids_of(&r["ids"])?, "{name} (agp={agp}): prompt ids differ");
    }
    Ok(())
}

#[test]
fn chat_template_errors_are_typed() -> Result<()> {
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools: ' + m.content) }}{% endif %}{% endfor %}",
        None,
        None,
    )?;
    match t.render(&[ChatMessage::new("tool", "x")], false) {
        Err(ChatTemplateError::Raised { message }) => assert_eq!(message, "no tools: x"),
        other => bail!("expected Raised, got {other:?}"),
    }
    assert!(matches!(ChatTemplate::new("{% for %}", None, None), Err(ChatTemplateError::Syntax { .. })));
    Ok(())
}

#[test]
fn unknown_pre_tokenizer_is_a_typed_error() -> Result<()> {
    let mut content = gguf_content()?;
    content.metadata.insert("tokenizer.ggml.pre".to_owned(), GgufValue::String("no-such-pre".to_owned()));
    match Tokenizer::from_gguf(&content) {
        Err(TokenizerError::UnknownPreTokenizer(name)) => assert_eq!(name, "no-such-pre"),
        other => bail!("expected UnknownPreTokenizer, got {other:?}"),
    }
    content.metadata.remove("tokenizer.ggml.tokens");
    assert!(matches!(
        Tokenizer::from_gguf(&content),
        Err(TokenizerError::MissingMetadata { key: "tokenizer.ggml.tokens" })
    ));
    Ok(())
}
