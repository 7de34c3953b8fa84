#!/usr/bin/env python3
"""A tiny random-weight Phi-3 GGUF (F32 weights) and llama.cpp's logits on it.

Writes tests/fixtures/tiny_gguf/phi3.gguf with the `gguf` package and
tests/fixtures/tiny_gguf/phi3.json with llama.cpp's (llama-cpp-python's) logits of every
position of a fixed token sequence, evaluated in one batch. Phi-3's shapes: q, k and v fused in
`attn_qkv` (4 query and 2 KV heads of 24 values: a head size whose 1/sqrt is not a power of
two), gate and up fused in `ffn_up` (gate rows first), an untied LM head, neox rope. A sliding
window is written (8) because Phi-3 files carry one, and llama.cpp ignores it for Phi-3.
Deterministic (fixed seed), no network.
"""
import argparse
import json
import os

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny_gguf")

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 96, 4, 2, 128, 3
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"]
TOKENS = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁the", "▁a", "ing", "▁to"]
TOKEN_IDS = [1] + [(i * 37 + 11) % len(TOKENS) for i in range(39)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=OUT_DIR)
    args = ap.parse_args()
    import gguf

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "phi3.gguf")
    rng = np.random.default_rng(5)

    def mat(rows, cols, scale):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(path, "phi3")
    w.add_name("tiny random phi3")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_sliding_window(8)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * len(TOKENS))
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * 5
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    w.add_tensor("token_embd.weight", mat(len(TOKENS), HIDDEN, 0.5))
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    w.add_tensor("output.weight", mat(len(TOKENS), HIDDEN, 0.2))
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(HIDDEN))
        w.add_tensor(p + "attn_qkv.weight", mat((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN, 0.15))
        w.add_tensor(p + "attn_output.weight", mat(HIDDEN, HEADS * HEAD_DIM, 0.1))
        w.add_tensor(p + "ffn_norm.weight", norm(HIDDEN))
        w.add_tensor(p + "ffn_up.weight", mat(2 * FFN, HIDDEN, 0.15))
        w.add_tensor(p + "ffn_down.weight", mat(HIDDEN, FFN, 0.1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=128, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False, seed=0)
    llm.eval(TOKEN_IDS)
    logits = [[round(float(x), 6) for x in llm.scores[i]] for i in range(len(TOKEN_IDS))]
    out = {
        "description": "llama.cpp logits of every position of token_ids, evaluated in one batch, on phi3.gguf "
        "(random weights, made by this script).",
        "generator": "tests/reference/tiny_phi3.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "token_ids": TOKEN_IDS,
        "logits": logits,
    }
    with open(os.path.join(args.out_dir, "phi3.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and phi3.json; logits[0][:4] = {logits[0][:4]}")


if __name__ == "__main__":
    main()
