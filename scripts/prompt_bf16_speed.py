"""Offline A/B/C of --prompt-bf16 (prompt positions on AMX bfloat16 tiles) and --dtype
bfloat16 (every position, weights converted at load) against the default int16 path,
interleaved round by round in one process: prefill-only batches (max_tokens=1) and a
64 x 128 batch. Needs a CPU with AMX-BF16.

    python scripts/prompt_bf16_speed.py [rounds]
"""
import sys
import time

from ostinato import LLM
from ostinato.bench.latency import synthetic_words
from ostinato.params import SamplingParams

CASES = ((64, 64, 1), (8, 1500, 1), (64, 64, 128))     # (prompts, words each, max_tokens)


def main(rounds: int) -> None:
    llms = {"int16": LLM("smollm2-135m-instruct"),
            "bf16": LLM("smollm2-135m-instruct", prompt_bf16=True),
            "dtype": LLM("smollm2-135m-instruct", dtype="bfloat16")}
    for llm in llms.values():
        llm.generate([synthetic_words(64, 1)], SamplingParams(max_tokens=4))
    for r in range(rounds):
        for n, words, max_tokens in CASES:
            for name, llm in llms.items():          # fresh prompts each: no prefix-cache hits
                salt = (1_000_000 * r + 1000 * n + words + 20_000 * list(llms).index(name)
                        + 100_000 * (max_tokens > 1))
                prompts = [synthetic_words(words, salt + i) for i in range(n)]
                t = time.perf_counter()
                llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                     ignore_eos=True))
                print(f"round {r}  {n} x {words} words, max_tokens {max_tokens:3d}  {name:5s} "
                      f"{time.perf_counter() - t:6.2f} s", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
