#!/usr/bin/env bash
# Engine speed beside llama.cpp, measured back to back in one run (same machine, same load):
# pp512 and tg128 on SmolLM2-135M-Instruct Q4_1 (or the GGUF in $SHOAL_BENCH_MODEL) with the
# same thread count, then the ratios. Needs llama-cpp-python (see tests/reference/README.md for
# the build flags). `SHOAL_BENCH_PROFILE=dev` builds the bench in the dev profile (the engine
# and its dependencies are optimised there too) instead of the release one.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads="${SHOAL_THREADS:-2}"
model="${SHOAL_BENCH_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
profile="${SHOAL_BENCH_PROFILE:-bench}"
cargo bench --profile "$profile" --bench speed --no-run >/dev/null 2>&1
shoal=$(SHOAL_THREADS=$threads SHOAL_BENCH_MODEL="$(realpath "$model")" \
    cargo bench --profile "$profile" --bench speed 2>/dev/null | grep '"engine"')
llama=$(python3 benches/llama_cpp_speed.py --threads "$threads" --model "$model")
echo "$shoal"
echo "$llama"
python3 - "$shoal" "$llama" <<'PY'
import json, sys
s, l = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"shoal/llama.cpp: pp512 {s['pp512_tok_s'] / l['pp512_tok_s']:.2f}x, tg128 {s['tg128_tok_s'] / l['tg128_tok_s']:.2f}x")
PY
