#!/usr/bin/env python3
"""Golden greedy-decoding reference for Gemma 3 270M (Q4_K_M GGUF) via llama.cpp.

Produces tests/fixtures/golden/gemma3_270m_q4_k_m.json (relative to the repo root). The model
comes from `bash deploy/fetch-gemma3.sh`. Same method as golden_smollm2.py, plus a prompt
longer than the model's 512-position sliding window and the ids of a mixed tokenizer corpus.

For each prompt we record:
  * the prompt and its token ids as llama.cpp tokenizes them
    (tokenize(prompt, add_bos=<gguf add_bos_token>, special=True));
  * 32 greedy tokens, decoded by hand (eval + argmax over the raw logits,
    no sampler involved);
  * at every step the top-5 (id, logit) pairs and the top1-top2 logit gap;
  * for the first step only, the full-precision logits of a fixed set of ids.

No network access; deterministic (greedy, fixed n_threads, fresh context per prompt).
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_MODEL = os.path.join(REPO_ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "golden", "gemma3_270m_q4_k_m.json")

PLACES = ["river", "mountain", "old mill", "harbour", "forest", "market", "bridge", "library"]
THINGS = ["weather", "birds", "price of bread", "stars", "strangers", "roads", "letters", "songs"]
# More than 512 tokens: the sliding-window layers stop seeing the start of the prompt.
LONG = "The traveller's journal.\n" + "\n".join(
    f"Day {i}: walked {3 * i + 7} miles towards the {PLACES[i % 8]} and wrote about the {THINGS[(i * 3) % 8]}."
    for i in range(1, 41)
) + "\nDay 41:"

PROMPTS = [
    {"name": "plain_capital", "prompt": "The capital of France is"},
    {"name": "code_fibonacci", "prompt": "def fibonacci(n):"},
    {
        "name": "chat_user",
        "prompt": "<start_of_turn>user\nWhat is the tallest mountain in the world?<end_of_turn>\n<start_of_turn>model\n",
    },
    {
        "name": "chat_system",
        "prompt": "<start_of_turn>user\nYou are a helpful assistant that answers briefly.\n\n"
        "List three primary colors.<end_of_turn>\n<start_of_turn>model\n",
    },
    {
        "name": "long_paragraph",
        "prompt": "The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based inks and a wooden screw press into a "
        "system that could produce books far faster than scribes. Within a few decades, print "
        "shops had spread across Europe, prices of books fell sharply, and literacy began to rise. "
        "Historians often argue that the most important consequence of this invention was",
    },
    {
        "name": "digits_unicode",
        "prompt": "Order #12345678 costs 3.14159 € — café naïve 東京 🚀. Next: 2, 4, 8, 16,",
    },
    {"name": "past_the_window", "prompt": LONG},
]

# Tokenizer corpus: llama.cpp's ids with add_bos=False, special=True.
CORPUS = [
    "Hello world",
    " Hello  world   ",
    "\tTabs\tand\nnewlines\n\n\nthree",
    "    indented code():\n        return x**2 + y//3",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after a literal bos<eos>",
    "unbekannte Wörter: Donaudampfschifffahrtsgesellschaft, naïveté, façade",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Русский текст и ελληνικά και العربية",
    "emoji 🚀🔥👩‍👩‍👧‍👦 and symbols ∑∫√ ≠ ≤",
    "numbers 0 1 12 123 1234 12345 3.14159 -2e10 1,000,000",
    "URL https://example.org/a/b?c=d&e=f#g and email a.b@c.de",
    "<html><body class=\"x\">&amp; &lt;tag&gt;</body></html>",
    "mixedCASE snake_case kebab-case CONSTANT_CASE",
    "   ",
    "\u00a0non-breaking\u2009thin\u200bzero-width",
    "rare bytes \x7f \x01 end",
    "A" * 40 + " " + "ab" * 30,
]

N_GEN = 32
TOP_K = 5
# <pad>, <eos>, <bos>, <unk>, <start_of_turn>, <end_of_turn>, a few ordinary ids, the last id
FIXED_IDS = [0, 1, 2, 3, 105, 106, 107, 1000, 100000, 262143]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def topk(logits, k):
    # stable: sort by (-logit, id)
    idx = np.lexsort((np.arange(len(logits)), -logits.astype(np.float64)))[:k]
    return [(int(i), float(logits[i])) for i in idx]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--n-threads", type=int, default=2)
    ap.add_argument("--n-ctx", type=int, default=1024)
    ap.add_argument("--n-gen", type=int, default=N_GEN)
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import llama_cpp
    from llama_cpp import Llama

    def make_llm():
        return Llama(
            model_path=args.model,
            n_ctx=args.n_ctx,
            n_threads=args.n_threads,
            n_threads_batch=args.n_threads,
            logits_all=True,
            verbose=False,
            seed=0,
        )

    llm = make_llm()
    md = dict(llm.metadata)
    add_bos_md = md.get("tokenizer.ggml.add_bos_token")
    add_bos = str(add_bos_md).lower() == "true" if add_bos_md is not None else False
    n_vocab = llm.n_vocab()

    results = []
    for p in PROMPTS:
        llm = make_llm()  # fresh context per prompt: no KV-cache carry-over
        toks = llm.tokenize(p["prompt"].encode("utf-8"), add_bos=add_bos, special=True)
        llm.eval(toks)
        steps = []
        gen = []
        for step in range(args.n_gen):
            logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32, copy=True)
            assert logits.shape == (n_vocab,)
            tk = topk(logits, TOP_K)
            nxt = tk[0][0]
            entry = {
                "step": step,
                "token": nxt,
                "top5": [[i, round(v, 5)] for i, v in tk],
                "gap_top1_top2": round(tk[0][1] - tk[1][1], 5),
            }
            if step == 0:
                entry["fixed_id_logits"] = {str(i): float(logits[i]) for i in FIXED_IDS}
                entry["logit_stats"] = {
                    "max": float(logits.max()),
                    "min": float(logits.min()),
                    "mean": float(logits.astype(np.float64).mean()),
                    "std": float(logits.astype(np.float64).std()),
                }
            steps.append(entry)
            gen.append(nxt)
            llm.eval([nxt])
        text = llm.detokenize(gen, special=True).decode("utf-8", errors="replace")
        gaps = [s["gap_top1_top2"] for s in steps]
        results.append(
            {
                "name": p["name"],
                "prompt": p["prompt"],
                "prompt_ids": list(map(int, toks)),
                "n_prompt_tokens": len(toks),
                "greedy_ids": gen,
                "greedy_text": text,
                "min_gap_top1_top2": min(gaps),
                "min_gap_step": int(np.argmin(gaps)),
                "steps": steps,
            }
        )
        print(f"[{p['name']}] {len(toks)} prompt toks; min gap {min(gaps):.4f} @ step {int(np.argmin(gaps))}")
        print(f"    -> {text!r}")

    corpus = [
        {"text": text, "ids": list(map(int, llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)))}
        for text in CORPUS
    ]

    out = {
        "description": "Greedy-decoding golden data from llama.cpp (llama-cpp-python) for Gemma 3 270M Q4_K_M. "
        "Prompt is eval'd in one batch, then each greedy token is eval'd one at a time; the logits "
        "recorded at step k are those predicting generated token k. Fresh context per prompt.",
        "generator": "tests/reference/golden_gemma3.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "model_file": os.path.basename(args.model),
        "model_sha256": sha256_file(args.model),
        "n_threads": args.n_threads,
        "n_ctx": args.n_ctx,
        "n_vocab": n_vocab,
        "tokenize": {
            "add_bos": add_bos,
            "gguf_tokenizer.ggml.add_bos_token": add_bos_md,
            "special": True,
        },
        "gguf_metadata": {k: md[k] for k in sorted(md) if k != "tokenizer.chat_template"},
        "n_gen": args.n_gen,
        "top_k_recorded": TOP_K,
        "fixed_ids": FIXED_IDS,
        "min_gap_top1_top2_overall": min(r["min_gap_top1_top2"] for r in results),
        "prompts": results,
        "tokenizer_corpus": corpus,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes); llama_cpp {llama_cpp.__version__}; "
          f"add_bos={add_bos}; overall min top1-top2 gap {out['min_gap_top1_top2_overall']:.4f}")


if __name__ == "__main__":
    sys.exit(main())
