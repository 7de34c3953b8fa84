"""Requantizes SmolLM2-135M-Instruct (models/SmolLM2-135M-Instruct.Q4_1.gguf) with llama.cpp's
own quantizer (llama-cpp-python's `llama_model_quantize`, `allow_requantize`: the Q4_1 values
are the source, so these files measure speed, not quality) into models/SmolLM2-135M-Instruct.
{Q4_K_M,Q5_K_M,Q6_K,Q8_0}.gguf, for benches/compare_llama_cpp.sh. Needs llama-cpp-python (see
tests/reference/README.md)."""
import argparse
import os
import sys

import llama_cpp

TYPES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q6_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}

ap = argparse.ArgumentParser()
ap.add_argument("--src", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--types", default=",".join(TYPES))
args = ap.parse_args()
for name in args.types.split(","):
    out = args.src.replace(".Q4_1.gguf", f".{name}.gguf")
    if os.path.exists(out):
        print(f"present: {out}")
        continue
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = TYPES[name]
    p.allow_requantize = True
    p.nthread = 2
    rc = llama_cpp.llama_model_quantize(args.src.encode(), out.encode(), p)
    if rc != 0:
        sys.exit(f"quantizing to {name} failed ({rc})")
    print(f"wrote {out}")
