#!/usr/bin/env python3
"""Tiny random-weight llama-family models + HF transformers reference logits.

Produces tests/fixtures/tiny/<name>/ (relative to the repo root) for
  llama, llama3, mistral, qwen2, qwen3, llama_tied, qwen2_bf16, mistral_f16
each containing the safetensors weights written by save_pretrained(safe_serialization=True),
config.json, generation_config.json and reference.json.

reference.json holds: the fixed input ids (12), transformers float32 logits of the last
position and of every position (rounded to 6 decimals), an 8-token greedy continuation
(full re-forward at each step, argmax over raw logits, with the top1-top2 gap), and the
config used. The reference is computed by *reloading the saved directory* with
from_pretrained(dtype=float32), so it reflects exactly what is on disk (for the bf16/f16
fixtures: the stored low-precision weights upcast to f32, computed in f32).

Weights: torch.manual_seed(seed) per model; initializer_range=0.1; additionally RMSNorm
weights are set to 1 + 0.1*N(0,1) and linear biases to 0.1*N(0,1) (HF init would leave
them at 1 / 0, which would hide loader bugs).

config.json format: the "llama"-family fixtures except qwen3 are rewritten in the classic
(transformers 4.x / Hub) layout: top-level "rope_theta", "rope_scaling" (null or dict) and
"torch_dtype". qwen3 keeps the transformers-5 native layout ("rope_parameters" holding
rope_theta, and "dtype"), so loaders are exercised on both. Both layouts are verified by
reloading them with transformers and checking the logits equal the in-memory model's.

No network access; deterministic on a given torch version.
"""
import argparse
import copy
import json
import os
import shutil
import sys

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "fixtures", "tiny")

INPUT_IDS = [1, 17, 42, 99, 128, 200, 255, 3, 64, 77, 150, 31]
N_GREEDY = 8

BASE = dict(
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=256,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
    hidden_act="silu",
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

# name -> (family, seed, extra config, save dtype, config layout, shards)
SPECS = {
    "llama": ("llama", 1001, dict(rope_theta=10000.0), "float32", "legacy", 2),
    "llama3": ("llama", 1002, dict(rope_theta=500000.0, rope_scaling=LLAMA3_ROPE), "float32", "legacy", 1),
    "mistral": ("mistral", 1003, dict(rope_theta=10000.0, sliding_window=4096), "float32", "legacy", 1),
    "qwen2": ("qwen2", 1004, dict(rope_theta=1000000.0, use_sliding_window=False), "float32", "legacy", 1),
    "qwen3": ("qwen3", 1005, dict(rope_theta=1000000.0, attention_bias=False, use_sliding_window=False),
              "float32", "native", 1),
    "llama_tied": ("llama", 1006, dict(rope_theta=10000.0, tie_word_embeddings=True), "float32", "legacy", 1),
    "qwen2_bf16": ("qwen2", 1007, dict(rope_theta=1000000.0, use_sliding_window=False), "bfloat16", "legacy", 1),
    "mistral_f16": ("mistral", 1008, dict(rope_theta=10000.0, sliding_window=4096), "float16", "legacy", 1),
}


def config_class(family):
    import transformers as T

    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
    }[family]


def make_config(family, extra):
    import transformers as T

    cfg_cls, _ = config_class(family)
    kw = dict(BASE)
    kw.update(extra)
    rope_theta = kw.pop("rope_theta")
    rope_scaling = kw.pop("rope_scaling", None)
    major = int(T.__version__.split(".")[0])
    if major >= 5:
        rp = {"rope_type": "default", "rope_theta": rope_theta}
        if rope_scaling:
            rp = dict(rope_scaling)
            rp["rope_theta"] = rope_theta
        kw["rope_parameters"] = rp
    else:
        kw["rope_theta"] = rope_theta
        kw["rope_scaling"] = rope_scaling
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    return cfg, rope_theta, rope_scaling


def perturb(model, torch):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def to_legacy_config(path, rope_theta, rope_scaling, dtype):
    with open(path) as f:
        cfg = json.load(f)
    native = copy.deepcopy(cfg)
    cfg.pop("rope_parameters", None)
    cfg.pop("dtype", None)
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = copy.deepcopy(rope_scaling) if rope_scaling else None
    cfg["torch_dtype"] = dtype
    cfg = {k: cfg[k] for k in sorted(cfg)}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return native, cfg


def forward_logits(model, torch, ids):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


def greedy(model, torch, ids, n):
    seq = list(ids)
    steps = []
    for _ in range(n):
        lg = forward_logits(model, torch, seq)[-1]
        vals, idx = torch.topk(lg, 2)
        nxt = int(idx[0])
        steps.append({"token": nxt, "logit": round(float(vals[0]), 6),
                      "gap_top1_top2": round(float(vals[0] - vals[1]), 6)})
        seq.append(nxt)
    return seq[len(ids):], steps


def rnd(t):
    if t.dim() == 0:
        return round(float(t), 6)
    return [rnd(x) for x in t]


def compact_json(obj):
    # indented at the top level, but each logits row on one line
    parts = []
    for k, v in obj.items():
        if k in ("logits_all", "logits_last"):
            body = json.dumps(v, separators=(",", ":"))
            if k == "logits_all":
                body = "[\n  " + ",\n  ".join(json.dumps(r, separators=(",", ":")) for r in v) + "\n ]"
        else:
            body = json.dumps(v, indent=1).replace("\n", "\n ")
        parts.append(f" {json.dumps(k)}: {body}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def dir_size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def build(name, out_root, torch):
    import transformers as T

    family, seed, extra, save_dtype, layout, want_shards = SPECS[name]
    cfg, rope_theta, rope_scaling = make_config(family, extra)
    _, model_cls = config_class(family)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    perturb(model, torch)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[save_dtype]
    model_f32 = copy.deepcopy(model)
    model = model.to(tdtype)

    d = os.path.join(out_root, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    save_kw = dict(safe_serialization=True)
    if want_shards > 1:
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        # just over half of the total -> exactly 2 shards (checked below)
        save_kw["max_shard_size"] = int(total * 0.55)
    model.save_pretrained(d, **save_kw)
    st_files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if len(st_files) != want_shards:
        raise SystemExit(f"{name}: expected {want_shards} safetensors files, got {st_files}")
    if want_shards > 1 and not os.path.exists(os.path.join(d, "model.safetensors.index.json")):
        raise SystemExit(f"{name}: missing model.safetensors.index.json")

    cfg_path = os.path.join(d, "config.json")
    if layout == "legacy":
        native_cfg, written_cfg = to_legacy_config(cfg_path, rope_theta, rope_scaling, save_dtype)
    else:
        with open(cfg_path) as f:
            native_cfg = written_cfg = json.load(f)

    # In-memory reference (same weights, upcast to f32; f32 rotary buffers) vs. reload from disk.
    mem = model_f32
    mem.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    mem.eval()
    ref = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    # check every tensor on disk == in-memory weights upcast to f32
    sd_mem = mem.state_dict()
    for k, v in ref.state_dict().items():
        if not torch.equal(v, sd_mem[k]):
            raise SystemExit(f"{name}: reloaded tensor {k} differs from saved weights")
    if family == "llama" and rope_scaling:
        rs = getattr(ref.config, "rope_parameters", None) or getattr(ref.config, "rope_scaling", None)
        if not rs or rs.get("rope_type") != "llama3":
            raise SystemExit(f"{name}: rope scaling not picked up on reload: {rs}")

    logits = forward_logits(ref, torch, INPUT_IDS)
    logits_mem = forward_logits(mem, torch, INPUT_IDS)
    max_diff_mem = float((logits - logits_mem).abs().max())
    if max_diff_mem > 1e-5:
        raise SystemExit(f"{name}: reload changed logits by {max_diff_mem} (config layout {layout} misread?)")
    gen_ids, gen_steps = greedy(ref, torch, INPUT_IDS, N_GREEDY)
    last = logits[-1]
    top2 = torch.topk(last, 2).values

    tensors = {}
    from safetensors import safe_open

    for f in st_files:
        with safe_open(os.path.join(d, f), "pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                tensors[k] = {"file": f, "dtype": t.get_dtype(), "shape": list(t.get_shape())}

    reference = {
        "name": name,
        "generator": "tests/reference/tiny_models.py",
        "architecture": model_cls.__name__,
        "family": family,
        "seed": seed,
        "init_notes": "HF init with initializer_range=0.1, then RMSNorm weights = 1+0.1*N(0,1), "
        "linear biases = 0.1*N(0,1)",
        "stored_dtype": save_dtype,
        "reference_compute": "transformers, float32, eager attention, CPU, reloaded from this directory"
        + ("" if save_dtype == "float32" else f" (stored {save_dtype} weights upcast to float32)"),
        "config_layout": layout,
        "config_used": written_cfg,
        "config_as_saved_by_transformers": native_cfg,
        "safetensors_files": st_files,
        "tensors": tensors,
        "input_ids": INPUT_IDS,
        "logits_last": rnd(last),
        "logits_all": rnd(logits),
        "logits_shape": list(logits.shape),
        "argmax_all_positions": [int(x) for x in logits.argmax(-1)],
        "last_top1_top2_gap": round(float(top2[0] - top2[1]), 6),
        "greedy": {
            "n_new_tokens": N_GREEDY,
            "method": "full re-forward each step (no KV cache), argmax of raw last-position logits",
            "new_ids": gen_ids,
            "steps": gen_steps,
        },
        "versions": {"torch": torch.__version__, "transformers": T.__version__},
        "reload_vs_in_memory_max_abs_diff": max_diff_mem,
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        f.write(compact_json(reference))
    min_gap = min(s["gap_top1_top2"] for s in gen_steps)
    print(f"{name:12s} {model_cls.__name__:18s} {save_dtype:8s} files={st_files} "
          f"size={dir_size(d)/1024:.0f}KiB logit_std={float(logits.std()):.3f} "
          f"greedy={gen_ids} min_greedy_gap={min_gap:.4f}")
    return dir_size(d)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", default=None, help="subset of: " + " ".join(SPECS))
    args = ap.parse_args()

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import torch

    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    total = 0
    for name in args.only or list(SPECS):
        total += build(name, args.out, torch)
    print(f"total {total/1024:.0f} KiB under {args.out}")


if __name__ == "__main__":
    sys.exit(main())
