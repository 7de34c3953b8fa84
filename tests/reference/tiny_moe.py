#!/usr/bin/env python3
"""Tiny random-weight mixture-of-experts GGUFs and llama.cpp's logits on them.

Writes, under tests/fixtures/tiny_gguf/ (made with the `gguf` package):
- qwen3moe.gguf: Qwen3-MoE's shapes (q/k RMSNorm per head, an explicit head size, neox rope),
  8 experts of which each token uses 2, an untied LM head, F32 weights;
- mixtral.gguf: Mixtral's (a `llama` file with `expert_count`: interleaved rope, tied
  embeddings), 4 experts of which each token uses 2, experts and attention quantized to Q8_0
  (the router and the norms stay F32, as llama.cpp's converter keeps them);
and for each, NAME.json with llama.cpp's (llama-cpp-python's) logits of every position of a
fixed token sequence, evaluated in one batch. The router's scores are spread wide enough that
the top-2 choice is never a near tie. Deterministic (fixed seeds), no network.
"""
import argparse
import json
import os

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny_gguf")

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "▁the", "▁a", "ing", "▁to"]
TOKEN_IDS = [1] + [(i * 53 + 7) % len(TOKENS) for i in range(39)]


def write_model(gguf, path, arch, cfg, rng, quant):
    hidden, heads, kv_heads, head_dim = cfg["hidden"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    experts, used, ffn, layers = cfg["experts"], cfg["used"], cfg["ffn"], cfg["layers"]

    def mat(*shape, scale):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def tensor(w, name, data):
        if quant is None or data.ndim < 2:
            w.add_tensor(name, data)
        else:
            q = gguf.quants.quantize(data, quant)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)

    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny random {arch} mixture of experts")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    if arch == "qwen3moe":
        w.add_expert_feed_forward_length(ffn)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10_000.0)
    w.add_layer_norm_rms_eps(1e-6)
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

    tensor(w, "token_embd.weight", mat(len(TOKENS), hidden, scale=0.5))
    w.add_tensor("output_norm.weight", norm(hidden))
    if not cfg["tied"]:
        tensor(w, "output.weight", mat(len(TOKENS), hidden, scale=0.2))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(hidden))
        tensor(w, p + "attn_q.weight", mat(heads * head_dim, hidden, scale=0.15))
        tensor(w, p + "attn_k.weight", mat(kv_heads * head_dim, hidden, scale=0.15))
        tensor(w, p + "attn_v.weight", mat(kv_heads * head_dim, hidden, scale=0.15))
        tensor(w, p + "attn_output.weight", mat(hidden, heads * head_dim, scale=0.1))
        if cfg["qk_norm"]:
            w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
            w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(hidden))
        # The router in F32 with a wide spread of scores: the top-k choice is clear.
        w.add_tensor(p + "ffn_gate_inp.weight", mat(experts, hidden, scale=0.6))
        tensor(w, p + "ffn_gate_exps.weight", mat(experts, ffn, hidden, scale=0.15))
        tensor(w, p + "ffn_up_exps.weight", mat(experts, ffn, hidden, scale=0.15))
        tensor(w, p + "ffn_down_exps.weight", mat(experts, hidden, ffn, scale=0.1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def logits_of(path):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=128, n_threads=2, n_threads_batch=2, logits_all=True, verbose=False, seed=0)
    llm.eval(TOKEN_IDS)
    return [[round(float(x), 6) for x in llm.scores[i]] for i in range(len(TOKEN_IDS))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default=OUT_DIR)
    args = ap.parse_args()
    import gguf
    import llama_cpp

    os.makedirs(args.out_dir, exist_ok=True)
    models = {
        "qwen3moe": (
            "qwen3moe",
            dict(hidden=64, heads=4, kv_heads=2, head_dim=32, experts=8, used=2, ffn=48, layers=3,
                 qk_norm=True, tied=False),
            None,
            11,
        ),
        "mixtral": (
            "llama",
            dict(hidden=64, heads=4, kv_heads=2, head_dim=16, experts=4, used=2, ffn=96, layers=2,
                 qk_norm=False, tied=True),
            gguf.GGMLQuantizationType.Q8_0,
            12,
        ),
    }
    for name, (arch, cfg, quant, seed) in models.items():
        path = os.path.join(args.out_dir, f"{name}.gguf")
        write_model(gguf, path, arch, cfg, np.random.default_rng(seed), quant)
        logits = logits_of(path)
        out = {
            "description": f"llama.cpp logits of every position of token_ids, evaluated in one batch, on {name}.gguf "
            "(random weights, made by this script).",
            "generator": "tests/reference/tiny_moe.py",
            "llama_cpp_python_version": llama_cpp.__version__,
            "token_ids": TOKEN_IDS,
            "logits": logits,
        }
        with open(os.path.join(args.out_dir, f"{name}.json"), "w") as f:
            json.dump(out, f)
            f.write("\n")
        print(f"wrote {path} ({os.path.getsize(path)} bytes) and {name}.json; logits[0][:4] = {logits[0][:4]}")


if __name__ == "__main__":
    main()
