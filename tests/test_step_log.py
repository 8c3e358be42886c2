"""The step log (`ostinato serve --step-log FILE`, LLM(step_log=...)): one JSON line per engine
step whose counts add up to the run's (every prompt token in a prompt chunk, every token after
a sequence's first from a decode row), the targets the scheduler set, and a summary that tells
the two kinds of step apart. Bad paths are one-line errors before the model loads."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from dataclasses import asdict

from ostinato import LLM, SamplingParams
from ostinato.engine import step_log
from ostinato.engine.step_log import StepRecord

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def run(path, tmp_path, target: str):
    log = tmp_path / f"steps-{target}.jsonl"
    llm = LLM(path, max_model_len=512, kv_cache_gb=0.05, target_itl_ms=target,
              max_num_batched_tokens=64, step_log=log)
    prompts = [llm.tokenize(f"word {i} " * (10 + 25 * i)) for i in range(4)]
    outs = llm.generate(prompts, PARAMS)
    return llm, prompts, outs, step_log.read(log)


def test_every_step_is_logged_and_the_counts_add_up(smollm_path, tmp_path):
    llm, prompts, outs, recs = run(smollm_path, tmp_path, "auto")
    assert len(recs) == llm.engine.stats.steps > len(prompts)
    assert sum(r.prompt_tokens for r in recs) == sum(map(len, prompts))   # no prefix hits
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    assert generated == len(prompts) * PARAMS.max_tokens
    assert sum(r.sampled_rows for r in recs) == generated
    assert sum(r.decode_rows for r in recs) == generated - len(prompts)  # the first: prefill
    assert all(r.tokens == r.prompt_tokens + r.decode_rows for r in recs)  # no drafts here
    assert all(r.seconds > 0 and r.predicted >= 0 for r in recs)
    assert [r.t for r in recs] == sorted(r.t for r in recs)
    assert recs[-1].running == recs[-1].waiting == 0
    # 64-token steps: the longest prompt (~200 tokens) took several; someone decoded beside
    # most of them, and such a step has auto's time limit (at least its 30 ms floor)
    limited = [r for r in recs if r.target is not None]
    assert limited and all(r.decode_rows for r in limited)
    assert all(r.target >= 0.030 and r.level is not None for r in limited)
    assert not any(r.target is not None for r in recs if not r.decode_rows)
    # the 4 prompts came together (one generate call): while some waited, the steps were
    # a burst's (its decode rows all came with the queue)
    bursts = [r for r in recs if r.burst]
    assert bursts and all(r.target >= 0.030 and r.decode_rows for r in bursts)


def test_without_a_target_no_step_has_one(smollm_path, tmp_path):
    _, prompts, _, recs = run(smollm_path, tmp_path, "off")
    assert recs and all(r.target is None and r.level is None for r in recs)
    assert sum(r.prompt_tokens for r in recs) == sum(map(len, prompts))


def test_a_prompts_one_token_last_chunk_is_a_prompt_chunk(smollm_path, tmp_path):
    """65 prompt tokens in 64-token steps: the second step computes the prompt's last token
    alone, a prompt chunk (it samples the first token), not a decode row."""
    log = tmp_path / "steps.jsonl"
    llm = LLM(smollm_path, max_model_len=256, kv_cache_gb=0.02, max_num_batched_tokens=64,
              step_log=log)
    llm.generate([list(range(300, 365))], SamplingParams(temperature=0, max_tokens=3,
                                                         ignore_eos=True))
    shape = [(r.prompt_tokens, r.decode_rows, r.sampled_rows) for r in step_log.read(log)]
    assert shape == [(64, 0, 0), (1, 0, 1), (0, 1, 1), (0, 1, 1)]


def test_a_log_that_cannot_be_written_is_turned_off_and_requests_go_on(smollm_path, tmp_path,
                                                                        caplog):
    llm = LLM(smollm_path, max_model_len=256, kv_cache_gb=0.02, step_log=tmp_path / "s.jsonl")
    written = []

    def full_disk(record):
        if written:
            raise OSError(28, "No space left on device")
        written.append(record)
    llm.engine.step_log.write = full_disk
    out = llm.generate([[1, 2, 3]], PARAMS)
    assert len(out[0].outputs[0].token_ids) == PARAMS.max_tokens
    assert len(written) == 1 and llm.engine.step_log is None
    assert "writing failed" in caplog.text and "No space left" in caplog.text


def rec(seconds, prompt, decode, target):
    return StepRecord(t=0.0, seconds=seconds, tokens=prompt + decode, prompt_tokens=prompt,
                      decode_rows=decode, sampled_rows=decode, running=decode, waiting=0,
                      predicted=seconds, target=target, level=target, threads=2)


def test_the_summary_tells_the_kinds_of_step_apart(tmp_path):
    recs = [rec(0.050, 40, 8, 0.050)] * 8 + [rec(0.100, 40, 8, 0.050)] * 2 + \
           [rec(0.020, 0, 8, 0.050)] * 5 + [rec(0.300, 512, 0, None)]
    text = step_log.summarize(recs)
    assert "decode rows + prompt chunks: 10 steps, ms p10 50.0 / p50 50.0 / p90 100.0" in text
    assert "time / target p50 1.00, p99 2.00" in text
    assert "decode rows only: 5 steps, ms p10 20.0" in text
    assert "prompt chunks only: 1 steps, ms p10 300.0" in text
    assert "steps by thread count: 2: 16" in text
    # read back from a file, a torn last line (a crash mid-write) skipped
    path = tmp_path / "log.jsonl"
    log = step_log.StepLog(path)
    for r in recs:
        log.write(r)
    log.close()
    with open(path, "a") as f:
        f.write('{"t": 1.0, "seconds"')
    with open(path, "a") as f:
        f.write("\n" + json.dumps({**asdict(recs[0]), "new_field": 1}) + "\n")
    assert step_log.read(path) == recs + recs[:1]     # a later version's field is ignored
    older = {k: v for k, v in asdict(rec(0.050, 40, 8, 0.150)).items() if k != "burst"}
    with open(path, "w") as f:                        # a log from before the burst field
        f.write(json.dumps(older) + "\n")
    assert step_log.read(path) == [rec(0.050, 40, 8, 0.150)]
    burst = dataclasses.replace(rec(0.150, 200, 8, 0.150), burst=True)
    assert "steps whose decode rows all came with the queue (a burst): 3" in \
        step_log.summarize(recs + [burst] * 3)
    assert step_log.summarize([]) == "no steps"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ostinato", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_bad_step_log_is_a_one_line_error_before_loading(tmp_path):
    for args in (["--step-log", str(tmp_path / "missing" / "steps.jsonl")],
                 ["--step-log", str(tmp_path / "s.jsonl"), "--replicas", "2"]):
        res = cli("serve", "--port", "1", *args)
        assert res.returncode == 1, res.stderr
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "step" in lines[0] and "log" in lines[0], res.stderr
    assert not (tmp_path / "s.jsonl").exists()       # refused before anything was opened
