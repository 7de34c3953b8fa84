"""llama.cpp's pp512 / tg128 on the same model and workload as benches/speed.rs, through
llama-cpp-python (built with CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON
-DGGML_FMA=ON -DGGML_F16C=ON"). Prints one JSON line."""
import argparse
import json
import statistics
import time

from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--reps", type=int, default=5)
args = ap.parse_args()

llm = Llama(model_path=args.model, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=args.threads,
            n_threads_batch=args.threads, verbose=False, logits_all=False)
prompt = [100 + (i * 7919) % 40000 for i in range(512)]

llm.reset(); llm.eval(prompt[:64])  # warm-up
pp, tg = [], []
for _ in range(args.reps):
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); pp.append(512 / (time.perf_counter() - t))
for _ in range(args.reps):
    llm.reset()
    t = time.perf_counter()
    for i in range(128):
        llm.eval([prompt[i]])
    tg.append(128 / (time.perf_counter() - t))
print(json.dumps({"engine": "llama.cpp", "threads": args.threads,
                  "pp512_tok_s": round(statistics.median(pp), 1), "tg128_tok_s": round(statistics.median(tg), 1)}))
