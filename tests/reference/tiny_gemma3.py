#!/usr/bin/env python3
"""A tiny random-weight Gemma 3 (or, with --arch gemma2, Gemma 2) GGUF (F32 weights) and
llama.cpp's logits on it.

Writes tests/fixtures/tiny_gguf/gemma3.gguf with the `gguf` package and
tests/fixtures/tiny_gguf/gemma3.json with llama.cpp's (llama-cpp-python's) logits of every
position of a fixed token sequence, evaluated in one batch. The model is small but has
everything the real ones have: head_dim (32) unlike hidden/heads (16), grouped-query heads
(4 query, 2 kv), q/k norms, post-attention and post-FFN norms, 7 layers with the sliding window
(8 positions, so the 40-token sequence runs past it) on layers 0-4 and 6 and a global layer 5,
and the linear rope scaling (factor 8) of the global layers that Gemma 3 4B and larger use.
F32 weights keep activations unquantized in both engines, so the comparison is tight.
The Gemma 2 model (tests/fixtures/tiny_gguf/gemma2.{gguf,json}) has no q/k norms and no rope
scaling, every other layer on the window (llama.cpp's default pattern), and soft-capping of
attention scores at 5 and of logits at 10 (small caps, so that they bite on random weights).
Deterministic (fixed seed), no network.
"""
import argparse
import json
import os

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny_gguf")

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, LAYERS, WINDOW = 64, 4, 2, 32, 96, 7, 8
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
TOKENS = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁the", "▁a", "ing", "▁to"]
TOKEN_IDS = [2] + [(i * 37 + 11) % len(TOKENS) for i in range(39)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=OUT_DIR)
    ap.add_argument("--arch", choices=["gemma3", "gemma2"], default="gemma3")
    args = ap.parse_args()
    gemma2 = args.arch == "gemma2"
    import gguf

    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"{args.arch}.gguf")
    rng = np.random.default_rng(3)

    def mat(rows, cols, scale):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = gguf.GGUFWriter(path, args.arch)
    w.add_name(f"tiny random {args.arch}")
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_key_length(HEAD_DIM)
    w.add_value_length(HEAD_DIM)
    w.add_rope_freq_base(1_000_000.0)
    if gemma2:
        w.add_attn_logit_softcapping(5.0)
        w.add_final_logit_softcapping(10.0)
    else:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_sliding_window(WINDOW)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * len(TOKENS))
    types = [gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * 4
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)

    w.add_tensor("token_embd.weight", mat(len(TOKENS), HIDDEN, 0.5))
    w.add_tensor("output_norm.weight", norm(HIDDEN))
    for i in range(LAYERS):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(HIDDEN))
        w.add_tensor(p + "attn_q.weight", mat(HEADS * HEAD_DIM, HIDDEN, 0.15))
        w.add_tensor(p + "attn_k.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN, 0.15))
        w.add_tensor(p + "attn_v.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN, 0.15))
        if not gemma2:
            w.add_tensor(p + "attn_q_norm.weight", norm(HEAD_DIM))
            w.add_tensor(p + "attn_k_norm.weight", norm(HEAD_DIM))
        w.add_tensor(p + "attn_output.weight", mat(HIDDEN, HEADS * HEAD_DIM, 0.1))
        w.add_tensor(p + "post_attention_norm.weight", norm(HIDDEN))
        w.add_tensor(p + "ffn_norm.weight", norm(HIDDEN))
        w.add_tensor(p + "ffn_gate.weight", mat(FFN, HIDDEN, 0.15))
        w.add_tensor(p + "ffn_up.weight", mat(FFN, HIDDEN, 0.15))
        w.add_tensor(p + "ffn_down.weight", mat(HIDDEN, FFN, 0.1))
        w.add_tensor(p + "post_ffw_norm.weight", norm(HIDDEN))
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
        "description": f"llama.cpp logits of every position of token_ids, evaluated in one batch, on {args.arch}.gguf "
        "(random weights, made by this script).",
        "generator": "tests/reference/tiny_gemma3.py",
        "llama_cpp_python_version": llama_cpp.__version__,
        "token_ids": TOKEN_IDS,
        "logits": logits,
    }
    with open(os.path.join(args.out_dir, f"{args.arch}.json"), "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {path} ({os.path.getsize(path)} bytes) and {args.arch}.json; logits[0][:4] = {logits[0][:4]}")


if __name__ == "__main__":
    main()
