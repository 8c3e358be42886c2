"""lm-eval on `ostinato serve` against lm-eval's `--model hf` on the same GGUF, item by item.

    python scripts/lm_eval_compare.py --model ~/.cache/ostinato/SmolLM2-135M-Instruct.Q4_1.gguf

Runs in a Python that has lm_eval and transformers (and gguf); starts `ostinato serve` from
this checkout. The task is small and local (no dataset download): a few sentences, each
with two continuations, scored by log-likelihood (multiple choice). lm-eval's
`local-completions` gets no tokenizer argument: it finds /tokenizer_info and uses the
server's /tokenize. transformers loads the GGUF dequantized to float32, so the two differ by
our quantized kernels only. Prints the per-item log-likelihood differences as JSON."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
ITEMS = [
    ("The capital of France is", [" Paris", " Berlin"]),
    ("Water freezes at zero degrees", [" Celsius", " Fahrenheit"]),
    ("The cat sat on the", [" mat", " moon"]),
    ("Two plus two equals", [" four", " seven"]),
    ("The sun rises in the", [" east", " west"]),
    ("A group of wolves is called a", [" pack", " library"]),
    ("Shakespeare wrote Romeo and", [" Juliet", " Jupiter"]),
    ("The largest ocean on Earth is the", [" Pacific", " Arctic"]),
]
TASK = """task: ostinato_tiny
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: 0
target_delimiter: ""
metric_list:
  - metric: acc
"""


def write_task(folder: Path) -> None:
    data = folder / "items.jsonl"
    data.write_text("".join(json.dumps({"context": c, "choices": ch}) + "\n" for c, ch in ITEMS))
    (folder / "ostinato_tiny.yaml").write_text(TASK.format(data=data))


def start_server(model: str, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ostinato", "serve", "--model", model, "--port", str(port),
           "--log-level", "warning", "--max-model-len", "1024", "--kv-cache-gb", "0.1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OSTINATO_API_KEY": ""}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start")


def loglikelihoods(model: str, model_args: str, tasks: Path) -> list[float]:
    import lm_eval
    from lm_eval.tasks import TaskManager
    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=["ostinato_tiny"],
                                  task_manager=TaskManager(include_path=str(tasks)),
                                  log_samples=True, batch_size=1)
    samples = sorted(out["samples"]["ostinato_tiny"], key=lambda s: s["doc_id"])
    return [float(r[0]) for s in samples for r in s["resps"] for r in [r[0]]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a .gguf file")
    ap.add_argument("--port", type=int, default=18321)
    a = ap.parse_args()
    gguf = Path(a.model).expanduser().resolve()
    with tempfile.TemporaryDirectory() as tmp:
        write_task(Path(tmp))
        proc = start_server(str(gguf), a.port)
        try:
            url = f"http://127.0.0.1:{a.port}/v1/completions"
            ours = loglikelihoods("local-completions",
                                  f"model={gguf.stem},base_url={url},num_concurrent=1",
                                  Path(tmp))
        finally:
            proc.terminate()
            proc.wait(30)
        hf = loglikelihoods("hf", f"pretrained={gguf.parent},gguf_file={gguf.name},"
                                  "dtype=float32,device=cpu", Path(tmp))
    diffs = [o - h for o, h in zip(ours, hf)]
    print(json.dumps({"items": len(ours), "ostinato": ours, "hf": hf,
                      "max_abs_diff": max(map(abs, diffs)),
                      "mean_abs_diff": sum(map(abs, diffs)) / len(diffs),
                      "same_choice": [int(ours[i] > ours[i + 1]) == int(hf[i] > hf[i + 1])
                                      for i in range(0, len(ours), 2)]}, indent=1))


if __name__ == "__main__":
    main()
