"""The decode step of N running sequences, per stage of the plan and outside it, for each
--dtype (and --kv-cache-dtype, after a slash): N prompts of 64 words are prefilled, then 40
steps in which every sequence decodes are timed (the plan's own stopwatch for its stages).
--dtype bfloat16 needs AMX-BF16.

    python scripts/decode_step_profile.py [model] [rows,rows,...] [dtype[/kv],...]
    python scripts/decode_step_profile.py smollm2-135m-instruct 1,16,64 auto,bfloat16
    python scripts/decode_step_profile.py smollm2-135m-instruct 64 bfloat16,bfloat16/int8-values
"""
import sys
import time

from ostinato import LLM
from ostinato.bench.latency import synthetic_words
from ostinato.params import SamplingParams

STEPS = 40


def decode_step(llm: LLM, rows: int) -> tuple[float, dict[str, float]]:
    """Seconds a decode step of `rows` sequences, and the plan's seconds a step by stage."""
    eng = llm.engine
    params = SamplingParams(max_tokens=STEPS + 100, temperature=0.0, ignore_eos=True)
    ids = [eng.add_request(llm.tokenize(synthetic_words(64, 7000 + i)), params)
           for i in range(rows)]
    sch = eng.scheduler
    while sch.waiting or any(not s.output_ids for s in sch.running):
        eng.step()
    for _ in range(5):
        eng.step()
    plan = eng.runner.forward.plan
    plan.set_profile(True)
    t0 = time.perf_counter()
    for _ in range(STEPS):
        eng.step()
    wall = (time.perf_counter() - t0) / STEPS
    stages = {k: v / STEPS for k, v in plan.profile().items()}
    plan.set_profile(False)
    for r in ids:
        eng.abort(r)
    while eng.has_unfinished():
        eng.step()
    return wall, stages


def main(model: str, rows: list[int], dtypes: list[str]) -> None:
    llms = {d: LLM(model, target_itl_ms="off", dtype=d.split("/")[0],
                   kv_cache_dtype=(d.split("/") + ["float16"])[1]) for d in dtypes}
    for n in rows:
        for d, llm in llms.items():
            wall, stages = decode_step(llm, n)
            plan = sum(stages.values())
            print(f"{model} {n:3d} rows  {d:13s} step {wall * 1e3:6.1f} ms  plan "
                  f"{plan * 1e3:6.1f}  outside {(wall - plan) * 1e3:5.1f}  | " +
                  ", ".join(f"{k} {v * 1e3:.1f}" for k, v in
                            sorted(stages.items(), key=lambda kv: -kv[1])), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-instruct",
         [int(r) for r in (sys.argv[2] if len(sys.argv) > 2 else "1,16,64").split(",")],
         (sys.argv[3] if len(sys.argv) > 3 else "auto,bfloat16").split(","))
