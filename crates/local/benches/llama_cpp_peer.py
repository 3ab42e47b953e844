"""The peer of `cargo bench -p descartes-local`: llama.cpp (through llama-cpp-python) on the same
GGUF, the same prompt tokens and the same thread count.

Reads one JSON object on stdin: {"model": PATH, "threads": N, "decode_prompt": [ids],
"decode_tokens": N, "pp_prompt": [ids], "runs": N}. Prints one JSON object:
{"version": ..., "decode": [tokens/s per run], "pp": [tokens/s per run]}.

Timed by wall clock around the same work as Descartes' side: prompt processing is one evaluation
of the whole prompt (batches of 512); decoding is greedy, one token per evaluation, after the
first token, so Python's per-token overhead (sampling in C, a few microseconds) is included as
Descartes' own loop is on its side.
"""

import json
import sys
import time

import llama_cpp
from llama_cpp import Llama


def main() -> None:
    job = json.load(sys.stdin)
    threads = job["threads"]
    n_ctx = max(len(job["pp_prompt"]), len(job["decode_prompt"]) + job["decode_tokens"]) + 64
    llm = Llama(
        model_path=job["model"],
        n_ctx=n_ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
        logits_all=False,
    )
    decode, pp = [], []
    for _ in range(job["runs"] + 1):
        # Prompt processing.
        llm.reset()
        started = time.perf_counter()
        llm.eval(job["pp_prompt"])
        pp.append(len(job["pp_prompt"]) / (time.perf_counter() - started))
        # Decoding: greedy, a fixed count.
        llm.reset()
        llm.eval(job["decode_prompt"])
        token = llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0)
        started = time.perf_counter()
        for _ in range(job["decode_tokens"] - 1):
            llm.eval([token])
            token = llm.sample(top_k=1, temp=0.0, repeat_penalty=1.0)
        decode.append((job["decode_tokens"] - 1) / (time.perf_counter() - started))
    # The first round warms caches up.
    print(json.dumps({"version": llama_cpp.__version__, "decode": decode[1:], "pp": pp[1:]}))


if __name__ == "__main__":
    main()
