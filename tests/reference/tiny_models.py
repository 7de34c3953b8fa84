#!/usr/bin/env python3
"""Tiny random-weight decoder models + HF transformers reference logits.

Produces tests/fixtures/tiny/<name>/ (relative to the repo root) for
  llama, llama3, mistral, qwen2, qwen3, llama_tied, qwen2_bf16, mistral_f16   (seeds 1001..1008)
  gemma3, gemma2, phi3, mixtral, qwen3_moe, gemma3_mm                          (seeds 2001..2006)
each containing the safetensors weights written by save_pretrained(safe_serialization=True)
(gemma3_mm: renamed to the Hub layout, see below),
config.json, generation_config.json and reference.json.

reference.json holds: the fixed input ids (12), transformers float32 logits of the last
position and of every position (rounded to 6 decimals), an 8-token greedy continuation
(full re-forward at each step, argmax over raw logits, with the top1-top2 gap), and the
config used. The reference is computed by *reloading the saved directory* with
from_pretrained(dtype=float32), so it reflects exactly what is on disk (for the bf16/f16
fixtures: the stored low-precision weights upcast to f32, computed in f32).

Weights: torch.manual_seed(seed) per model; initializer_range=0.1; additionally RMSNorm
weights are set to 1 + 0.1*N(0,1) and linear biases to 0.1*N(0,1) (HF init would leave
them at 1 / 0, which would hide loader bugs). Exception: Gemma's RMSNorm computes
x * (1 + w) and HF initialises w to 0, so for the gemma2/gemma3 fixtures the norm weights
(including q_norm/k_norm) are set to 0.1*N(0,1) instead (effective scale 1 + 0.1*N(0,1)).
MoE routers (mlp.gate / block_sparse_moe.gate) and the experts keep the HF init
(normal, std 0.1).

New families (2001..2006):
  gemma3     Gemma3ForCausalLM (gemma3_text), 6 layers, layer_types S,S,F,S,S,F,
             sliding_window 4 (< the 12 input tokens), local rope base 1e4, global rope
             1e6 with linear scaling 2 on the full layers, query_pre_attn_scalar 24 (!= head_dim),
             gelu_pytorch_tanh, tied embeddings (scaled by sqrt(hidden)), q/k norms.
  gemma2     Gemma2ForCausalLM, 4 layers alternating sliding/full, sliding_window 4,
             attn_logit_softcapping 5, final_logit_softcapping 3, tied embeddings.
  phi3       Phi3ForCausalLM, fused self_attn.qkv_proj and mlp.gate_up_proj, untied head.
  mixtral    MixtralForCausalLM, 4 experts, top-2, untied.
  qwen3_moe  Qwen3MoeForCausalLM, 8 experts, top-2, norm_topk_prob, q/k norms, untied.
  gemma3_mm  Gemma3ForConditionalGeneration (model_type gemma3, as Gemma 3 4B/12B/27B ship): the
             gemma3 text_config (same shapes, seed 2006) plus a minimal SigLIP tower (hidden 16,
             1 layer, image 4x4, patch 2) and projector, mm_tokens_per_image 4, boi/eoi/image ids
             250/251/252 (inside the vocab, not in INPUT_IDS). The reference is the multimodal
             model run on input_ids only (no image), i.e. what a text-only loader of its language
             model must reproduce. Tensors are written in the transformers 4.5x Hub layout
             (language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*; tied,
             so no lm_head); transformers 5 itself writes language_model.model.* too, but
             vision_tower.* without "vision_model.", so the tower's tensors are renamed; the native
             names are kept in reference.json["native_tensor_names"] and both layouts are reloaded.
             "checks" holds the max |logit diff| against Gemma3ForCausalLM on the same weights (0)
             and the embedding scale (sqrt(64) in both).
For the MoE models transformers 5 keeps the experts fused in memory (3-D gate_up_proj /
down_proj) but save_pretrained writes the per-expert Hub layout (mixtral:
block_sparse_moe.experts.E.w1/w2/w3, qwen3_moe: mlp.experts.E.gate_proj/up_proj/down_proj);
the script checks every per-expert tensor on disk against the fused in-memory weights.
The MoE references use experts_implementation="eager". reference.json of the new fixtures
has an extra "checks" object (diagnostics: effect of each feature on the logits, router
margins, pre-cap maxima).

config.json format: the "llama"-family fixtures except qwen3 are rewritten in the classic
(transformers 4.x / Hub) layout: top-level "rope_theta", "rope_scaling" (null or dict) and
"torch_dtype". qwen3 keeps the transformers-5 native layout ("rope_parameters" holding
rope_theta, and "dtype"), so loaders are exercised on both. Both layouts are verified by
reloading them with transformers and checking the logits equal the in-memory model's.
gemma3, gemma2, phi3 and mixtral use the classic layout too; gemma3 additionally gets the
Gemma-3 Hub keys "rope_local_base_freq" and "sliding_window_pattern" (and keeps
"layer_types"); its global-layer linear scaling goes to top-level "rope_scaling".
qwen3_moe keeps the native layout (note: transformers 5 writes "num_local_experts" there,
where Hub Qwen3-MoE configs say "num_experts"). gemma3_mm gets the same classic keys inside its
nested "text_config" (transformers 5 writes "rope_parameters" per layer type there) and
"torch_dtype" at the top level only, as the Hub Gemma 3 configs.

No network access; deterministic on a given torch version.
"""
import argparse
import copy
import json
import os
import shutil
import sys
import tempfile

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

DROP = object()  # in an extra-config dict: remove this BASE key

GEMMA_COMMON = dict(
    hidden_act=DROP,
    hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6,
    bos_token_id=2,
    eos_token_id=1,
    pad_token_id=0,
    tie_word_embeddings=True,
)

# Gemma 3 text config, shared by gemma3 (Gemma3ForCausalLM) and the language model of gemma3_mm
GEMMA3_TEXT = dict(
    GEMMA_COMMON,
    num_hidden_layers=6,
    layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
    sliding_window=4,
    sliding_window_pattern=3,  # kept by transformers as "_sliding_window_pattern" (default 6)
    rope_theta=1000000.0,
    rope_local_base_freq=10000.0,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    query_pre_attn_scalar=24,
    final_logit_softcapping=None,
    attn_logit_softcapping=None,
)
GEMMA3_LEGACY_EXTRA = dict(rope_local_base_freq=10000.0, sliding_window_pattern=3)

# gemma3_mm: the smallest SigLIP tower that constructs (it only has to exist in the file) and
# the multimodal ids. The special ids are inside the vocab, as in the Hub checkpoints
# (boi 255999 < eoi 256000 < image 262144 < vocab 262208), and none of them is in INPUT_IDS.
GEMMA3_MM_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_channels=3,
    image_size=4,
    patch_size=2,  # 2x2 patches per image
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=False,  # as in the Hub configs
)
GEMMA3_MM_TOP = dict(
    mm_tokens_per_image=4,  # 2x2 -> avg-pool kernel 1
    boi_token_index=250,
    eoi_token_index=251,
    image_token_index=252,
)

# name -> (family, seed, extra config, save dtype, config layout, shards[, legacy-layout extras])
# The optional 7th element holds keys added to config.json in the classic layout (gemma3).
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
    "gemma3": ("gemma3", 2001, GEMMA3_TEXT, "float32", "legacy", 1, GEMMA3_LEGACY_EXTRA),
    "gemma2": ("gemma2", 2002, dict(
        GEMMA_COMMON,
        layer_types=["sliding_attention", "full_attention"] * 2,
        sliding_window=4,
        rope_theta=10000.0,
        query_pre_attn_scalar=16,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ), "float32", "legacy", 1),
    "phi3": ("phi3", 2003, dict(
        head_dim=DROP,  # Phi3Config has no head_dim (hidden / heads = 16)
        rope_theta=10000.0,
        original_max_position_embeddings=128,
        sliding_window=None,
        pad_token_id=0,  # the default 32000 is outside the vocab
    ), "float32", "legacy", 1),
    "mixtral": ("mixtral", 2004, dict(
        head_dim=DROP,  # as in the Hub configs: derived from hidden / heads = 16
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        rope_theta=1000000.0,
        sliding_window=None,
    ), "float32", "legacy", 1),
    "qwen3_moe": ("qwen3_moe", 2005, dict(
        rope_theta=1000000.0,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=64,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        use_sliding_window=False,
        attention_bias=False,
    ), "float32", "native", 1),
    # Gemma3ForConditionalGeneration (model_type gemma3): the text part has the gemma3 shapes
    "gemma3_mm": ("gemma3_mm", 2006, GEMMA3_TEXT, "float32", "legacy", 1, GEMMA3_LEGACY_EXTRA),
}

GEMMA_FAMILIES = ("gemma2", "gemma3")
MOE_FAMILIES = ("mixtral", "qwen3_moe")


def config_class(family):
    import transformers as T

    return {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM),
        "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
        "phi3": (T.Phi3Config, T.Phi3ForCausalLM),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM),
        "qwen3_moe": (T.Qwen3MoeConfig, T.Qwen3MoeForCausalLM),
        "gemma3_mm": (T.Gemma3Config, T.Gemma3ForConditionalGeneration),
    }[family]


def make_config(family, extra):
    import transformers as T

    if family == "gemma3_mm":
        # the language model's config is exactly the gemma3 one; wrap it with a SigLIP tower
        text_cfg, rope_theta, rope_scaling = make_config("gemma3", extra)
        cfg = T.Gemma3Config(
            text_config=text_cfg,
            vision_config=T.SiglipVisionConfig(**GEMMA3_MM_VISION),
            initializer_range=BASE["initializer_range"],
            tie_word_embeddings=True,
            **GEMMA3_MM_TOP,
        )
        cfg._attn_implementation = "eager"  # propagates to text_config / vision_config
        return cfg, rope_theta, rope_scaling
    cfg_cls, _ = config_class(family)
    kw = dict(BASE)
    kw.update(extra)
    kw = {k: v for k, v in kw.items() if v is not DROP}
    rope_theta = kw.pop("rope_theta")
    rope_scaling = kw.pop("rope_scaling", None)
    rope_local = kw.pop("rope_local_base_freq", None)
    major = int(T.__version__.split(".")[0])
    if major >= 5:
        rp = {"rope_type": "default", "rope_theta": rope_theta}
        if rope_scaling:
            rp = dict(rope_scaling)
            rp["rope_theta"] = rope_theta
        if family == "gemma3":
            # per layer type; the scaling applies to the global (full-attention) layers only
            rp = {"full_attention": rp, "sliding_attention": {"rope_type": "default", "rope_theta": rope_local}}
        kw["rope_parameters"] = rp
    else:
        kw["rope_theta"] = rope_theta
        kw["rope_scaling"] = rope_scaling
        if rope_local is not None:
            kw["rope_local_base_freq"] = rope_local
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    if family in MOE_FAMILIES:
        cfg._experts_implementation = "eager"
    return cfg, rope_theta, rope_scaling


def perturb(model, torch, family):
    if family == "gemma3_mm":
        # language model and projector norms are Gemma RMSNorms (1 + w); the SigLIP tower has
        # ordinary LayerNorms (weight and bias); the projection matrix is HF-initialised to 0.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".vision_tower." in name:
                    if name.endswith(".bias"):
                        p.copy_(0.1 * torch.randn_like(p))
                    elif "norm" in name and p.dim() == 1:
                        p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif "norm" in name and p.dim() == 1:
                    p.copy_(0.1 * torch.randn_like(p))
                elif name.endswith("mm_input_projection_weight"):
                    p.copy_(0.1 * torch.randn_like(p))
                elif name.endswith(".bias"):
                    p.copy_(0.1 * torch.randn_like(p))
        return
    # Gemma RMSNorm multiplies by (1 + w), HF init w = 0: use w = 0.1*N(0,1) there.
    norm_offset = 0.0 if family in GEMMA_FAMILIES else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(norm_offset + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))


def to_legacy_config(path, rope_theta, rope_scaling, dtype, legacy_extra=None, drop_null=()):
    with open(path) as f:
        cfg = json.load(f)
    native = copy.deepcopy(cfg)
    cfg.pop("rope_parameters", None)
    cfg.pop("dtype", None)
    for k in drop_null:
        if k in cfg and cfg[k] is None:
            del cfg[k]
    cfg["rope_theta"] = rope_theta
    cfg["rope_scaling"] = copy.deepcopy(rope_scaling) if rope_scaling else None
    cfg["torch_dtype"] = dtype
    cfg.update(copy.deepcopy(legacy_extra or {}))
    cfg = {k: cfg[k] for k in sorted(cfg)}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return native, cfg


def to_legacy_mm_config(path, rope_theta, rope_scaling, dtype, legacy_extra):
    """gemma3_mm: the transformers-4.x / Hub layout of a Gemma3ForConditionalGeneration config.

    The nested text_config gets the classic Gemma 3 rope keys (rope_theta, rope_local_base_freq,
    rope_scaling, sliding_window_pattern) instead of the per-layer-type "rope_parameters";
    "dtype" becomes "torch_dtype" wherever transformers wrote it.
    """
    with open(path) as f:
        cfg = json.load(f)
    native = copy.deepcopy(cfg)
    tc = cfg["text_config"]
    tc.pop("rope_parameters", None)
    tc["rope_theta"] = rope_theta
    tc["rope_scaling"] = copy.deepcopy(rope_scaling) if rope_scaling else None
    tc.update(copy.deepcopy(legacy_extra or {}))
    for sub in (cfg, tc, cfg["vision_config"]):
        if "dtype" in sub:
            sub["torch_dtype"] = sub.pop("dtype")
    cfg["torch_dtype"] = dtype
    cfg["text_config"] = {k: tc[k] for k in sorted(tc)}
    cfg["vision_config"] = {k: cfg["vision_config"][k] for k in sorted(cfg["vision_config"])}
    cfg = {k: cfg[k] for k in sorted(cfg)}
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return native, cfg


# gemma3_mm tensor names: whatever transformers 5 writes -> the Hub (transformers 4.5x) layout of
# google/gemma-3-*-it: language_model.model.*, vision_tower.vision_model.*, multi_modal_projector.*
GEMMA3_MM_HUB_PREFIXES = (
    # (prefix written by save_pretrained, Hub prefix); first match wins
    ("language_model.model.", "language_model.model."),
    ("model.language_model.", "language_model.model."),
    ("language_model.", "language_model.model."),
    ("vision_tower.vision_model.", "vision_tower.vision_model."),
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


def gemma3_mm_hub_name(native):
    for src, dst in GEMMA3_MM_HUB_PREFIXES:
        if native.startswith(src):
            return dst + native[len(src):]
    raise SystemExit(f"gemma3_mm: unexpected tensor name written by save_pretrained: {native}")


def rewrite_gemma3_mm_tensors(d, st_files, torch):
    """Rename the tensors in the saved file(s) to the Hub layout; returns (native names, renames)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if st_files != ["model.safetensors"]:
        raise SystemExit(f"gemma3_mm: expected a single model.safetensors, got {st_files}")
    path = os.path.join(d, "model.safetensors")
    with safe_open(path, "pt") as sf:
        meta = sf.metadata()
        native = {k: sf.get_tensor(k) for k in sf.keys()}
    renamed = {}
    prefixes = {}
    for k, v in native.items():
        h = gemma3_mm_hub_name(k)
        if h in renamed:
            raise SystemExit(f"gemma3_mm: two tensors map to {h}")
        renamed[h] = v.contiguous()
        src = next(p for p, _ in GEMMA3_MM_HUB_PREFIXES if k.startswith(p))
        prefixes[src] = h[: len(h) - len(k) + len(src)]
    save_file(renamed, path, metadata=meta)
    return sorted(native), {k: prefixes[k] for k in sorted(prefixes)}


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


def max_abs(a, b):
    return float((a - b).abs().max())


def ablation_diff(model_cls, cfg, state_dict, logits, edit, torch):
    """Max |logits - logits of the same weights under an edited config| (how much a feature matters)."""
    c = copy.deepcopy(cfg)
    edit(c)
    m = model_cls(c).eval()
    m.load_state_dict(state_dict)
    return round(max_abs(forward_logits(m, torch, INPUT_IDS), logits), 6)


def set_rope(layer_type, **kw):
    def edit(c):
        rp = dict(c.rope_parameters[layer_type], **kw)
        c.rope_parameters[layer_type] = {k: v for k, v in rp.items() if v is not None}
    return edit


def set_attrs(**kw):
    def edit(c):
        for k, v in kw.items():
            setattr(c, k, v)
    return edit


def family_checks(name, family, model_cls, cfg, ref, mem, logits, tensors, d, torch):
    """Structural checks + diagnostics for the newer families; returns the "checks" dict."""
    import transformers as T
    from safetensors import safe_open

    sd = mem.state_dict()
    checks = {}
    if family == "gemma3":
        checks["ablation_max_abs_logit_diff"] = {
            "sliding_window_4_vs_64": ablation_diff(model_cls, cfg, sd, logits, set_attrs(sliding_window=64), torch),
            "global_linear_rope_factor_2_vs_none": ablation_diff(
                model_cls, cfg, sd, logits, set_rope("full_attention", rope_type="default", factor=None), torch),
            "local_rope_base_1e4_vs_1e6": ablation_diff(
                model_cls, cfg, sd, logits, set_rope("sliding_attention", rope_theta=1000000.0), torch),
            "query_pre_attn_scalar_24_vs_16": ablation_diff(
                model_cls, cfg, sd, logits, set_attrs(query_pre_attn_scalar=16), torch),
        }
    if family == "gemma3_mm":
        checks.update(gemma3_mm_checks(name, cfg, ref, mem, logits, tensors, torch))
    if family == "gemma2":
        # maxima before the tanh soft-caps (attention scores incl. the 1/sqrt(query_pre_attn_scalar) scale)
        mod = T.models.gemma2.modeling_gemma2
        orig = mod.eager_attention_forward
        seen = []

        def spy(module, query, key, value, attention_mask, scaling=None, **kw):
            k = mod.repeat_kv(key, module.num_key_value_groups)
            s = torch.matmul(query, k.transpose(2, 3)) * scaling
            causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
            seen.append(float(s.masked_select(causal).abs().max()))
            return orig(module, query, key, value, attention_mask, scaling=scaling, **kw)

        mod.eager_attention_forward = spy
        try:
            forward_logits(ref, torch, INPUT_IDS)
        finally:
            mod.eager_attention_forward = orig
        with torch.no_grad():
            h = ref.model(input_ids=torch.tensor([INPUT_IDS]), use_cache=False).last_hidden_state
            raw = ref.lm_head(h)[0]
        checks["max_abs_attn_score_before_softcap_per_layer"] = [round(x, 6) for x in seen]
        checks["max_abs_logit_before_final_softcap"] = round(float(raw.abs().max()), 6)
        checks["max_abs_logit_after_final_softcap"] = round(float(logits.abs().max()), 6)
        checks["ablation_max_abs_logit_diff"] = {
            "attn_softcap_5_vs_none": ablation_diff(
                model_cls, cfg, sd, logits, set_attrs(attn_logit_softcapping=None), torch),
            "final_softcap_3_vs_none": ablation_diff(
                model_cls, cfg, sd, logits, set_attrs(final_logit_softcapping=None), torch),
            "sliding_window_4_vs_64": ablation_diff(model_cls, cfg, sd, logits, set_attrs(sliding_window=64), torch),
        }
    if family == "phi3":
        for k in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"):
            if k not in tensors:
                raise SystemExit(f"{name}: expected fused tensor {k} on disk, got {sorted(tensors)}")
    if family in MOE_FAMILIES:
        # the file must hold the per-expert Hub layout, equal to slices of the fused in-memory tensors
        if family == "mixtral":
            pre, names = "block_sparse_moe", ("w1", "w3", "w2")  # gate, up, down
        else:
            pre, names = "mlp", ("gate_proj", "up_proj", "down_proj")
        n_exp = cfg.num_local_experts if family == "mixtral" else cfg.num_experts
        inter = cfg.intermediate_size if family == "mixtral" else cfg.moe_intermediate_size
        fused = [k for k, v in tensors.items() if len(v["shape"]) == 3]
        if fused:
            raise SystemExit(f"{name}: fused 3-D tensors on disk: {fused}")
        with safe_open(os.path.join(d, "model.safetensors"), "pt") as sf:
            for layer in range(cfg.num_hidden_layers):
                gate_up = sd[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
                down = sd[f"model.layers.{layer}.mlp.experts.down_proj"]
                if not torch.equal(sf.get_tensor(f"model.layers.{layer}.{pre}.gate.weight"),
                                   sd[f"model.layers.{layer}.mlp.gate.weight"]):
                    raise SystemExit(f"{name}: router of layer {layer} differs on disk")
                for e in range(n_exp):
                    want = (gate_up[e, :inter], gate_up[e, inter:], down[e])
                    for nm, w in zip(names, want):
                        k = f"model.layers.{layer}.{pre}.experts.{e}.{nm}.weight"
                        if not torch.equal(sf.get_tensor(k), w):
                            raise SystemExit(f"{name}: {k} on disk != in-memory fused expert slice")
        # routing diagnostics on the prompt
        top_k = cfg.num_experts_per_tok
        captured = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda m, i, o: captured.append(o))
                 for layer in ref.model.layers]
        try:
            forward_logits(ref, torch, INPUT_IDS)
        finally:
            for h in hooks:
                h.remove()
        per_layer = []
        for router_logits, _, idx in captured:
            probs = torch.softmax(router_logits.float(), dim=-1)
            srt = probs.sort(dim=-1, descending=True).values
            per_layer.append({
                "distinct_experts_chosen": len(set(int(x) for x in idx.flatten())),
                "top_k_per_position": [[int(x) for x in row] for row in idx],
                "min_prob_margin_kth_vs_next": round(float((srt[:, top_k - 1] - srt[:, top_k]).min()), 6),
            })
        checks["routing"] = per_layer
        if per_layer[0]["distinct_experts_chosen"] < 3:
            raise SystemExit(f"{name}: routing hardly varies in layer 0: {per_layer[0]}")
        if family == "qwen3_moe":
            checks["ablation_max_abs_logit_diff"] = {
                "norm_topk_prob_true_vs_false": ablation_diff(
                    model_cls, cfg, sd, logits, set_attrs(norm_topk_prob=False), torch),
            }
    return checks


def gemma3_mm_checks(name, cfg, ref, mem, logits, tensors, torch):
    """The multimodal checkpoint's text path == Gemma3ForCausalLM on the same language-model weights."""
    import transformers as T

    bad = [k for k in tensors if not k.startswith(("language_model.model.", "vision_tower.vision_model.",
                                                  "multi_modal_projector."))]
    if bad:
        raise SystemExit(f"{name}: tensors outside the Hub layout on disk: {bad}")
    if "language_model.lm_head.weight" in tensors or "lm_head.weight" in tensors:
        raise SystemExit(f"{name}: lm_head written although the embeddings are tied")
    for tok in ("image_token_index", "boi_token_index", "eoi_token_index"):
        if getattr(cfg, tok) in INPUT_IDS:
            raise SystemExit(f"{name}: {tok} {getattr(cfg, tok)} occurs in INPUT_IDS")

    # Gemma3ForCausalLM built from text_config, loaded with the language-model weights
    text_cfg = copy.deepcopy(cfg.text_config)
    text_cfg._attn_implementation = "eager"
    causal = T.Gemma3ForCausalLM(text_cfg).eval()
    pre = "model.language_model."
    sd = {("model." + k[len(pre):]): v for k, v in mem.state_dict().items() if k.startswith(pre)}
    sd["lm_head.weight"] = mem.state_dict()["lm_head.weight"]
    causal.load_state_dict(sd, strict=True)
    if not torch.equal(causal.lm_head.weight, causal.model.embed_tokens.weight):
        raise SystemExit(f"{name}: Gemma3ForCausalLM head not tied")
    logits_causal = forward_logits(causal, torch, INPUT_IDS)

    # embeddings: both scale the looked-up rows by sqrt(hidden)
    ids = torch.tensor([INPUT_IDS])
    emb_mm = ref.model.language_model.embed_tokens
    emb_c = causal.model.embed_tokens
    with torch.no_grad():
        e_mm = emb_mm(ids)
        e_c = emb_c(ids)
        e_manual = emb_mm.weight[ids] * torch.tensor(cfg.text_config.hidden_size ** 0.5)
    hidden = cfg.text_config.hidden_size

    # the vision path runs (config coherent): BOS, BOI, 4 image tokens, EOI, text
    g = torch.Generator().manual_seed(0)
    n_img = cfg.mm_tokens_per_image
    mm_ids = [2, cfg.boi_token_index] + [cfg.image_token_index] * n_img + [cfg.eoi_token_index, 17, 42]
    vc = cfg.vision_config
    pix = torch.randn(1, vc.num_channels, vc.image_size, vc.image_size, generator=g)
    tt = torch.tensor([[1 if t == cfg.image_token_index else 0 for t in mm_ids]])
    with torch.no_grad():
        out_img = ref(input_ids=torch.tensor([mm_ids]), pixel_values=pix, token_type_ids=tt, use_cache=False)
        out_noimg = ref(input_ids=torch.tensor([mm_ids]), use_cache=False)
    if not bool(torch.isfinite(out_img.logits).all()):
        raise SystemExit(f"{name}: non-finite logits with an image")

    return {
        "multimodal_vs_Gemma3ForCausalLM_same_weights_max_abs_logit_diff": max_abs(logits, logits_causal),
        "embed_scale": {
            "multimodal": float(emb_mm.embed_scale),
            "causal_lm": float(emb_c.embed_scale),
            "sqrt_hidden_size": hidden ** 0.5,
            "max_abs_embedding_diff_multimodal_vs_causal_lm": max_abs(e_mm, e_c),
            "max_abs_embedding_diff_vs_weight_times_sqrt_hidden": max_abs(e_mm, e_manual),
        },
        "image_smoke_test": {
            "input_ids": mm_ids,
            "max_abs_logit_change_from_the_image_at_the_last_position": round(
                max_abs(out_img.logits[0, -1], out_noimg.logits[0, -1]), 6),
        },
    }


def dir_size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


def build(name, out_root, torch):
    import transformers as T

    family, seed, extra, save_dtype, layout, want_shards, *legacy_extra = SPECS[name]
    legacy_extra = legacy_extra[0] if legacy_extra else None
    cfg, rope_theta, rope_scaling = make_config(family, extra)
    _, model_cls = config_class(family)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    perturb(model, torch, family)
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

    native_names = native_prefixes = native_dir = None
    if family == "gemma3_mm":
        # keep a copy of what transformers wrote, to check below that it reads both layouts the same
        native_dir = tempfile.mkdtemp(prefix="gemma3_mm_native_")
        shutil.copytree(d, os.path.join(native_dir, "m"))
        native_names, native_prefixes = rewrite_gemma3_mm_tensors(d, st_files, torch)

    cfg_path = os.path.join(d, "config.json")
    if family == "gemma3_mm":
        native_cfg, written_cfg = to_legacy_mm_config(cfg_path, rope_theta, rope_scaling, save_dtype, legacy_extra)
    elif layout == "legacy":
        native_cfg, written_cfg = to_legacy_config(cfg_path, rope_theta, rope_scaling, save_dtype,
                                                   legacy_extra, drop_null=("head_dim",))
    else:
        with open(cfg_path) as f:
            native_cfg = written_cfg = json.load(f)

    # In-memory reference (same weights, upcast to f32; f32 rotary buffers) vs. reload from disk.
    mem = model_f32
    mem.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    mem.eval()
    load_kw = dict(experts_implementation="eager") if family in MOE_FAMILIES else {}
    ref, info = model_cls.from_pretrained(d, dtype=torch.float32, attn_implementation="eager",
                                          output_loading_info=True, **load_kw)
    ref.eval()
    bad = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if bad or info.get("error_msgs"):
        raise SystemExit(f"{name}: from_pretrained reported {bad} {info.get('error_msgs')}")
    # check every tensor on disk == in-memory weights upcast to f32
    sd_mem = mem.state_dict()
    for k, v in ref.state_dict().items():
        if not torch.equal(v, sd_mem[k]):
            raise SystemExit(f"{name}: reloaded tensor {k} differs from saved weights")
    if family == "llama" and rope_scaling:
        rs = getattr(ref.config, "rope_parameters", None) or getattr(ref.config, "rope_scaling", None)
        if not rs or rs.get("rope_type") != "llama3":
            raise SystemExit(f"{name}: rope scaling not picked up on reload: {rs}")
    # the config as read back from disk must equal the one the weights were made with
    if family == "gemma3_mm":
        for key in ("mm_tokens_per_image", "boi_token_index", "eoi_token_index", "image_token_index",
                    "tie_word_embeddings"):
            if getattr(ref.config, key) != getattr(cfg, key):
                raise SystemExit(f"{name}: config {key} read back as {getattr(ref.config, key)!r}")
        for key in GEMMA3_MM_VISION:
            if getattr(ref.config.vision_config, key) != getattr(cfg.vision_config, key):
                raise SystemExit(f"{name}: vision_config {key} read back as "
                                 f"{getattr(ref.config.vision_config, key)!r}")
    cfg_chk, ref_cfg_chk = (cfg.text_config, ref.config.text_config) if family == "gemma3_mm" else (cfg, ref.config)
    for key in ("rope_parameters", "layer_types", "sliding_window", "query_pre_attn_scalar",
                "attn_logit_softcapping", "final_logit_softcapping", "head_dim", "num_local_experts",
                "num_experts", "num_experts_per_tok", "norm_topk_prob", "tie_word_embeddings"):
        if hasattr(cfg_chk, key) and getattr(ref_cfg_chk, key, None) != getattr(cfg_chk, key):
            raise SystemExit(f"{name}: config {key} read back as {getattr(ref_cfg_chk, key, None)!r}, "
                             f"made with {getattr(cfg_chk, key)!r}")

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

    checks = None
    if family in GEMMA_FAMILIES + MOE_FAMILIES + ("phi3", "gemma3_mm"):
        checks = family_checks(name, family, model_cls, cfg, ref, mem, logits, tensors, d, torch)
    if family == "gemma3_mm":
        checks["native_to_hub_prefix"] = native_prefixes
        nat, nat_info = model_cls.from_pretrained(os.path.join(native_dir, "m"), dtype=torch.float32,
                                                  attn_implementation="eager", output_loading_info=True)
        shutil.rmtree(native_dir)
        if any(v for k, v in nat_info.items()):
            raise SystemExit(f"{name}: native layout: from_pretrained reported {nat_info}")
        for k, v in nat.state_dict().items():
            if not torch.equal(v, sd_mem[k]):
                raise SystemExit(f"{name}: native layout: reloaded tensor {k} differs")
        checks["native_layout_reload_max_abs_logit_diff"] = max_abs(forward_logits(nat.eval(), torch, INPUT_IDS),
                                                                    logits)

    init_notes = ("HF init with initializer_range=0.1, then RMSNorm weights = 1+0.1*N(0,1), "
                  "linear biases = 0.1*N(0,1)")
    if family in GEMMA_FAMILIES:
        init_notes = ("HF init with initializer_range=0.1, then RMSNorm weights w = 0.1*N(0,1) "
                      "(Gemma RMSNorm scales by 1+w)")
    elif family == "gemma3_mm":
        init_notes = ("HF init with initializer_range=0.1, then Gemma RMSNorm weights (language model, "
                      "mm_soft_emb_norm) w = 0.1*N(0,1) (scale 1+w); mm_input_projection_weight = 0.1*N(0,1); "
                      "SigLIP LayerNorm weights 1+0.1*N(0,1) and all vision biases 0.1*N(0,1)")
    elif family in MOE_FAMILIES:
        init_notes += "; router and experts: HF init (normal, std 0.1); experts_implementation eager"

    reference = {
        "name": name,
        "generator": "tests/reference/tiny_models.py",
        "architecture": model_cls.__name__,
        "family": family,
        "seed": seed,
        "init_notes": init_notes,
        "stored_dtype": save_dtype,
        "reference_compute": "transformers, float32, eager attention, CPU, reloaded from this directory"
        + ("" if save_dtype == "float32" else f" (stored {save_dtype} weights upcast to float32)"),
        "config_layout": layout,
        "config_used": written_cfg,
        "config_as_saved_by_transformers": native_cfg,
        "safetensors_files": st_files,
        "tensors": tensors,
        **({"native_tensor_names": native_names} if native_names is not None else {}),
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
    if checks is not None:
        reference["checks"] = checks
    with open(os.path.join(d, "reference.json"), "w") as f:
        f.write(compact_json(reference))
    min_gap = min(s["gap_top1_top2"] for s in gen_steps)
    print(f"{name:12s} {model_cls.__name__:18s} {save_dtype:8s} files={st_files} "
          f"size={dir_size(d)/1024:.0f}KiB logit_std={float(logits.std()):.3f} "
          f"greedy={gen_ids} min_greedy_gap={min_gap:.4f} max_logit={float(logits.abs().max()):.4f} "
          f"reload_diff={max_diff_mem:.3g}")
    if checks is not None:
        print(f"  checks: {json.dumps(checks)}")
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
