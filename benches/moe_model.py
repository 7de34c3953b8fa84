#!/usr/bin/env python3
"""Writes a random-weight Qwen3-MoE GGUF for speed and memory benchmarks (not for quality):
models/bench-qwen3moe.Q8_0.gguf, then models/bench-qwen3moe.Q4_K_M.gguf requantized from it
by llama.cpp's own quantizer (llama-cpp-python; the `gguf` package cannot write K-quants). Shapes in the proportions of Qwen3-30B-A3B, scaled
down: hidden 1024, 8 layers, 16 query / 4 KV heads of 64 with q/k norms, 32 experts of 512
of which each token uses 4 (an eighth of the expert weights are active), a 49,152-token
vocabulary (SmolLM2's size, with byte tokens), tied embeddings. Weights in Q8_0, router and
norms F32. Needs numpy, the `gguf` package and llama-cpp-python; deterministic, no network.
"""
import argparse
import os

import numpy as np

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "models", "bench-qwen3moe.Q8_0.gguf"))
    ap.add_argument("--layers", type=int, default=8)
    args = ap.parse_args()
    import gguf

    hidden, heads, kv_heads, head_dim = 1024, 16, 4, 64
    n_experts, used, ffn, layers = 32, 4, 512, args.layers
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"tok{i}" for i in range(49152 - len(tokens))]
    rng = np.random.default_rng(7)
    q8 = gguf.GGMLQuantizationType.Q8_0
    qe = q8

    def mat(*shape, scale):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def quant(w, name, data, qtype):
        q = gguf.quants.quantize(data, qtype)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    w = gguf.GGUFWriter(args.out, "qwen3moe")
    w.add_name("random qwen3moe for benchmarks")
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(4 * hidden)
    w.add_expert_feed_forward_length(ffn)
    w.add_expert_count(n_experts)
    w.add_expert_used_count(used)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(1_000_000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    types = [gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (len(tokens) - len(types))
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    quant(w, "token_embd.weight", mat(len(tokens), hidden, scale=0.5), q8)
    w.add_tensor("output_norm.weight", norm(hidden))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", norm(hidden))
        quant(w, p + "attn_q.weight", mat(heads * head_dim, hidden, scale=0.05), q8)
        quant(w, p + "attn_k.weight", mat(kv_heads * head_dim, hidden, scale=0.05), q8)
        quant(w, p + "attn_v.weight", mat(kv_heads * head_dim, hidden, scale=0.05), q8)
        quant(w, p + "attn_output.weight", mat(hidden, heads * head_dim, scale=0.03), q8)
        w.add_tensor(p + "attn_q_norm.weight", norm(head_dim))
        w.add_tensor(p + "attn_k_norm.weight", norm(head_dim))
        w.add_tensor(p + "ffn_norm.weight", norm(hidden))
        w.add_tensor(p + "ffn_gate_inp.weight", mat(n_experts, hidden, scale=0.1))
        quant(w, p + "ffn_gate_exps.weight", mat(n_experts, ffn, hidden, scale=0.05), qe)
        quant(w, p + "ffn_up_exps.weight", mat(n_experts, ffn, hidden, scale=0.05), qe)
        quant(w, p + "ffn_down_exps.weight", mat(n_experts, hidden, ffn, scale=0.05), qe)
        print(f"layer {i} written", flush=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2**20:.1f} MiB)")

    import llama_cpp

    out = args.out.replace(".Q8_0.gguf", ".Q4_K_M.gguf")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    p.allow_requantize = True
    p.nthread = 2
    if llama_cpp.llama_model_quantize(args.out.encode(), out.encode(), p) != 0:
        raise SystemExit("quantizing to Q4_K_M failed")
    print(f"wrote {out} ({os.path.getsize(out) / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
