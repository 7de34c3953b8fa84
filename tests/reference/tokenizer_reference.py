#!/usr/bin/env python3
"""Tokenizer + chat-template reference for SmolLM2-135M-Instruct (GGUF) via llama.cpp and jinja2.

Produces tests/fixtures/golden/smollm2_tokenizer.json (relative to the repo root):
  * llama.cpp token ids (tokenize(text, add_bos=False, special=True)) for a mixed corpus,
    plus, for comparison, ids with special=False;
  * detokenize() of each id list (special=False and special=True) as text and hex;
  * piece bytes (hex) of a selection of ids;
  * tokenizer.chat_template from the GGUF metadata and its rendering of several
    conversations, rendered with jinja2 exactly as HF transformers does
    (ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)), and the
    llama.cpp token ids of each rendering.

No network access; deterministic.
"""
import argparse
import json
import os
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "golden", "smollm2_tokenizer.json")

CORPUS = [
    # English
    ("en_simple", "Hello, world!"),
    ("en_sentence", "The quick brown fox jumps over the lazy dog."),
    ("en_contractions", "I'm sure you'll see they've done it, haven't they?"),
    ("en_caps", "HELLO World hELLo"),
    ("leading_space", " leading space"),
    ("leading_spaces2", "  two leading spaces"),
    ("trailing_space", "trailing space "),
    ("empty", ""),
    ("single_char", "a"),
    ("single_space", " "),
    # whitespace runs
    ("ws_3spaces", "   "),
    ("ws_3newlines", "\n\n\n"),
    ("ws_space_tab_space", " \t "),
    ("ws_mixed", "a  b   c\t\td\n \n e"),
    ("ws_crlf", "line1\r\nline2\r\n"),
    # code
    ("code_python", "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"),
    ("code_tabs", "int main() {\n\tprintf(\"hi\\n\");\n\t\treturn 0;\n}\n"),
    ("code_rust", "fn main() { let x: Vec<u8> = vec![1, 2, 3]; println!(\"{:?}\", x); }"),
    ("code_json", "{\"key\": [1, 2.5, null, true], \"nested\": {\"a\": \"b\"}}"),
    # digits
    ("digits_8", "12345678"),
    ("digits_pi", "3.14159"),
    ("digits_mixed", "In 2024, 1,000,000 people paid $49.99 (about 10%)."),
    ("digits_long", "0000000000 9999999999 123abc456"),
    # unicode
    ("accents", "Café naïve résumé façade Ångström"),
    ("german", "Straße Größe Übermäßig"),
    ("cjk_zh", "你好，世界！我爱编程。"),
    ("cjk_ja", "東京は日本の首都です。カタカナ"),
    ("korean", "안녕하세요 세계"),
    ("arabic", "مرحبا بالعالم"),
    ("hindi", "नमस्ते दुनिया"),
    ("russian", "Привет, мир!"),
    ("greek_math", "∑ αβγ ≤ ∞ → ∀x∈ℝ"),
    # emoji
    ("emoji_simple", "I love 🍕 and 🚀!"),
    ("emoji_zwj_family", "👨‍👩‍👧‍👦"),
    ("emoji_zwj_mixed", "Team: 👩🏽‍💻 🏳️‍🌈 ❤️‍🔥"),
    ("emoji_flags", "🇫🇷🇯🇵"),
    # special tokens inside text
    ("special_chat", "<|im_start|>user\nhi<|im_end|>"),
    ("special_eot", "<|endoftext|>"),
    ("special_inline", "before<|endoftext|>after"),
    ("special_full_chat", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"),
    ("special_partial", "<|im_start|"),
    # misc
    ("url", "https://example.com/path?query=1&x=y#frag"),
    ("punct_run", "!!!???...---***"),
]

PIECE_IDS = [0, 1, 2, 3, 10, 100, 198, 216, 255, 256, 1000, 12345, 49151]

CONVERSATIONS = [
    {
        "name": "user_only",
        "messages": [{"role": "user", "content": "Hello! How are you?"}],
    },
    {
        "name": "system_multi_turn",
        "messages": [
            {"role": "system", "content": "You are a pirate. Answer like one."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Arr, ahoy matey!"},
            {"role": "user", "content": "Where is the treasure?"},
        ],
    },
    {
        "name": "user_assistant_no_system",
        "messages": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "2+2 = 4."},
        ],
    },
]


def render_chat_template(template, messages, add_generation_prompt, bos_token, eos_token):
    """Render like transformers' _compile_jinja_template / apply_chat_template."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        raise RuntimeError("strftime_now not supported in deterministic reference")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos_token,
        eos_token=eos_token,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--no-hf", action="store_true",
                    help="skip the transformers cross-check (tokenizer converted from the GGUF by transformers)")
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import jinja2
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=args.model, n_ctx=512, n_threads=2, vocab_only=True, verbose=False, seed=0)
    md = dict(llm.metadata)
    n_vocab = llm.n_vocab()

    def tok(text, special):
        return list(map(int, llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)))

    def detok(ids, special):
        b = llm.detokenize(ids, special=special) if ids else b""
        return {"text": b.decode("utf-8", errors="replace"), "hex": b.hex(), "utf8_valid": _valid(b)}

    hf_tok, hf_version = None, None
    if not args.no_hf:
        import transformers

        hf_version = transformers.__version__
        hf_tok = transformers.AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(args.model)), gguf_file=os.path.basename(args.model))

    corpus_out = []
    for name, text in CORPUS:
        ids = tok(text, True)
        ids_nospecial = tok(text, False)
        d_plain = detok(ids, False)
        d_special = detok(ids, True)
        corpus_out.append(
            {
                "name": name,
                "text": text,
                "text_utf8_hex": text.encode("utf-8").hex(),
                "ids": ids,
                "ids_special_false": ids_nospecial if ids_nospecial != ids else "same",
                "detok_special_false": d_plain["text"],
                "detok_special_true": d_special["text"],
                "detok_special_true_hex": d_special["hex"],
                "roundtrip_exact_special_true": d_special["text"] == text,
            }
        )
        if hf_tok is not None:
            hf_ids = list(map(int, hf_tok.encode(text, add_special_tokens=False)))
            corpus_out[-1]["hf_transformers_ids"] = "same" if hf_ids == ids else hf_ids

    pieces = []
    for i in PIECE_IDS:
        if i >= n_vocab:
            continue
        b = llm.detokenize([i], special=True)
        b_plain = llm.detokenize([i], special=False)
        pieces.append({"id": i, "piece_hex": b.hex(), "piece_text": b.decode("utf-8", errors="replace"),
                       "piece_hex_special_false": b_plain.hex()})

    template = md.get("tokenizer.chat_template")
    bos_id = int(md.get("tokenizer.ggml.bos_token_id", -1))
    eos_id = int(md.get("tokenizer.ggml.eos_token_id", -1))
    bos_token = llm.detokenize([bos_id], special=True).decode("utf-8") if bos_id >= 0 else ""
    eos_token = llm.detokenize([eos_id], special=True).decode("utf-8") if eos_id >= 0 else ""

    renders = []
    if template:
        for conv in CONVERSATIONS:
            for agp in (True, False):
                text = render_chat_template(template, conv["messages"], agp, bos_token, eos_token)
                renders.append(
                    {
                        "name": conv["name"],
                        "add_generation_prompt": agp,
                        "messages": conv["messages"],
                        "rendered": text,
                        "ids": tok(text, True),
                    }
                )
                if hf_tok is not None:
                    hf_text = hf_tok.apply_chat_template(conv["messages"], tokenize=False,
                                                         add_generation_prompt=agp)
                    renders[-1]["hf_apply_chat_template_same"] = hf_text == text

    out = {
        "description": "llama.cpp tokenizer reference (tokenize with add_bos=False, special=True unless noted) "
        "and HF-style jinja2 chat-template renderings for SmolLM2-135M-Instruct.",
        "generator": "tests/reference/tokenizer_reference.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "jinja2_version": jinja2.__version__,
        "model_file": os.path.basename(args.model),
        "n_vocab": n_vocab,
        "tokenize_options": {"add_bos": False, "special": True},
        "gguf_tokenizer_metadata": {
            k: md[k] for k in sorted(md) if k.startswith("tokenizer.") and k != "tokenizer.chat_template"
        },
        "bos_token": bos_token,
        "eos_token": eos_token,
        "hf_cross_check": None if hf_tok is None else {
            "transformers_version": hf_version,
            "what": "transformers AutoTokenizer.from_pretrained(<models dir>, gguf_file=<gguf>) "
            "(tokenizer converted from the GGUF by transformers), encode(add_special_tokens=False); "
            "per corpus entry 'hf_transformers_ids' is 'same' or the differing ids",
        },
        "corpus": corpus_out,
        "pieces": pieces,
        "chat_template": template,
        "chat_template_render_env": "jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True); "
        "vars: messages, add_generation_prompt, bos_token, eos_token; raise_exception global, tojson filter",
        "chat_renders": renders,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    n_rt = sum(c["roundtrip_exact_special_true"] for c in corpus_out)
    print(f"corpus: {len(corpus_out)} strings, {n_rt} round-trip exactly with detokenize(special=True)")
    for c in corpus_out:
        if not c["roundtrip_exact_special_true"]:
            print(f"  no exact round-trip: {c['name']}: {c['text']!r} -> {c['detok_special_true']!r}")
    if hf_tok is not None:
        diff = [c["name"] for c in corpus_out if c["hf_transformers_ids"] != "same"]
        print(f"transformers (GGUF-converted tokenizer) differs from llama.cpp on {len(diff)}: {diff}")
        print(f"hf apply_chat_template == jinja2 render: {[r['hf_apply_chat_template_same'] for r in renders]}")
    print(f"bos={bos_token!r} eos={eos_token!r}; chat template {'present' if template else 'MISSING'}; "
          f"{len(renders)} renders")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes)")


def _valid(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
