"""llama.cpp's prefill and decode on the same GGUF, as `mezo bench engine --peer` measures them.

Through llama-cpp-python, with the same thread count and the same token ids as the Rust side
(it tokenizes): prefill is one `eval` of the long prompt into a fresh context (median of
several), decode is greedy (argmax of the last logits) one token per `eval` after a short
prompt, one over the median step's time, as `mezo bench engine` times its own batch-1 decode.

Input: a JSON file (argv[1]). Output: one JSON line on stdout.
"""

import json
import resource
import sys
import time

import numpy as np
from llama_cpp import Llama, __version__


def main():
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    threads = spec["threads"]
    llm = Llama(
        model_path=spec["model"],
        n_threads=threads,
        n_threads_batch=threads,
        n_ctx=1024,
        n_batch=512,
        verbose=False,
    )
    prompt = spec["prefill_prompt"]
    times = []
    for _ in range(spec["prefill_reps"] + 1):
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        times.append(time.perf_counter() - start)
    # The first pass warms caches and the allocator, as on the Rust side.
    prefill = len(prompt) / float(np.median(times[1:]))

    llm.reset()
    llm.eval(spec["decode_prompt"])
    steps = spec["decode_steps"]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
        times.append(time.perf_counter() - start)
    decode = 1.0 / float(np.median(times))

    print(
        json.dumps(
            {
                "versions": {"llama_cpp_python": __version__},
                "threads": threads,
                "prefill_tokens_per_s": prefill,
                "decode_tokens_per_s": decode,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
