"""Writes tests/fixtures/hf_tokenizer/smollm2/: SmolLM2's tokenizer as a Hugging Face
directory (tokenizer.json, tokenizer_config.json, chat_template.jinja), converted from the
GGUF by transformers, so that shoal's Hugging Face tokenizer path is tested against the same
llama.cpp ids as its GGUF path. Needs `transformers gguf` (versions in README.md)."""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from transformers import AutoTokenizer  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model-dir", default="models")
ap.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--out", default="tests/fixtures/hf_tokenizer/smollm2")
args = ap.parse_args()

tok = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=args.gguf)
os.makedirs(args.out, exist_ok=True)
tok.save_pretrained(args.out)
print({f: os.path.getsize(os.path.join(args.out, f)) for f in sorted(os.listdir(args.out))})
