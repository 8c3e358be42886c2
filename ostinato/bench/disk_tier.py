"""`ostinato bench --disk-tier`: time to first token of a long prompt seen before a restart.

Each measurement is a fresh process (a restart: RAM's prefix cache is empty) that loads the
model, warms up on an unrelated short prompt, then times one request of the long prompt
(prefill plus the first token):
- cold: no disk tier (what every restart costs today);
- cold + write: the disk tier on an empty directory (what writing the blocks costs);
- restart, page cache: the directory written by a previous process, its files in the OS page
  cache (a restart soon after);
- restart, from disk: the same after the files are dropped from the page cache
  (posix_fadvise DONTNEED), so the blocks come from the device.
Rounds interleave the variants; medians are reported. The disk's own sequential read rate is
measured on a scratch file of the same size as the blocks, uncached the same way, so the disk
tier's read rate can be stated against it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .latency import synthetic_prompt

VARIANTS = ("cold", "cold + write", "restart, page cache", "restart, from disk")


def _child(model: str, root: str | None, prompt_tokens: int, threads: int) -> dict:
    """One process's measurement (run by `python -m ostinato.bench.disk_tier`)."""
    from ..llm import LLM
    from ..params import SamplingParams
    kw = {"kv_cache_dir": root} if root else {}
    llm = LLM(model, threads=threads, max_model_len=prompt_tokens + 64, **kw)
    one = SamplingParams(max_tokens=1, temperature=0)
    llm.generate(synthetic_prompt(llm, 64, salt=99), one)      # warm-up
    prompt = synthetic_prompt(llm, prompt_tokens, salt=1)
    disk = llm.engine.disk
    before = dataclasses.replace(disk.stats) if disk is not None else None
    t0 = time.perf_counter()
    out = llm.generate(prompt, one)[0]
    ttft = time.perf_counter() - t0
    fig = {"ttft_s": ttft, "token": out.outputs[0].token_ids,
           "prefix_hits": llm.engine.scheduler.kv.prefix_hits}
    if disk is not None:
        t0 = time.perf_counter()
        disk.close()
        st = disk.stats          # the timed request's reads (the warm-up's are not counted)
        fig |= {"flush_s": time.perf_counter() - t0,
                "blocks_read": st.blocks_read - before.blocks_read,
                "bytes_read": st.bytes_read - before.bytes_read,
                "read_s": st.read_seconds - before.read_seconds,
                "blocks_written": st.blocks_written, "bytes_on_disk": disk.num_bytes}
    return fig


def _run_child(model: str, root: str | None, prompt_tokens: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "ostinato.bench.disk_tier", model, root or "-",
           str(prompt_tokens), str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"the disk-tier bench's child failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def drop_from_page_cache(root: Path) -> None:
    """Ask the OS to forget the cached pages of every file under root (no root needed)."""
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_read_rate(where: Path, nbytes: int) -> float:
    """Bytes per second of one sequential read of an uncached scratch file of nbytes."""
    path = where / "read-rate.scratch"
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(chunk)
    try:
        drop_from_page_cache(where)
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            n = 0
            while data := f.read(1 << 22):
                n += len(data)
        return n / (time.perf_counter() - t0)
    finally:
        path.unlink()


def run_disk_tier(model: str, prompt_tokens: int = 4000, repeats: int = 3,
                  threads: int = 2, log=print) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ostinato-kv-bench-") as tmp:
        for r in range(repeats):
            root = Path(tmp) / f"round{r}"
            for v in VARIANTS:
                if v == "restart, from disk":
                    drop_from_page_cache(root)
                fig = _run_child(model, None if v == "cold" else str(root), prompt_tokens,
                                 threads)
                runs[v].append(fig)
                log(f"  round {r + 1}/{repeats} {v}: TTFT {fig['ttft_s'] * 1e3:.0f} ms")
        on_disk = runs["cold + write"][0]["bytes_on_disk"]
        rate = disk_read_rate(Path(tmp), on_disk)
    return summarize(runs, rate, prompt_tokens)


def summarize(runs: dict[str, list[dict]], disk_rate: float, prompt_tokens: int) -> dict:
    med = {v: statistics.median(f["ttft_s"] for f in figs) for v, figs in runs.items()}
    tokens = {tuple(f["token"]) for figs in runs.values() for f in figs}
    out = {"prompt_tokens": prompt_tokens, "ttft_s": med,
           "ratio_to_cold": {v: med[v] / med["cold"] for v in med},
           "same_first_token": len(tokens) == 1, "disk_read_rate_Bps": disk_rate}
    for v in ("restart, page cache", "restart, from disk"):
        figs = runs[v]
        read_s = statistics.median(f["read_s"] for f in figs)
        out[f"{v}: tier read rate_Bps"] = statistics.median(
            f["bytes_read"] / f["read_s"] for f in figs if f["read_s"])
        out[f"{v}: read_s"] = read_s
        out[f"{v}: blocks_read"] = figs[0]["blocks_read"]
    out["write_flush_s"] = statistics.median(f["flush_s"] for f in runs["cold + write"])
    return out


def report(fig: dict) -> str:
    lines = [f"Disk tier: time to first token of a {fig['prompt_tokens']}-token prompt, "
             f"each a fresh process (medians)", "",
             "| variant | TTFT ms | / cold |", "| --- | --- | --- |"]
    for v, s in fig["ttft_s"].items():
        lines.append(f"| {v} | {s * 1e3:.0f} | {fig['ratio_to_cold'][v]:.3f} |")
    disk = fig["disk_read_rate_Bps"] / 1e6
    lines += ["", f"the device's sequential read rate (uncached scratch file): {disk:.0f} MB/s"]
    for v in ("restart, page cache", "restart, from disk"):
        rate = fig[f"{v}: tier read rate_Bps"] / 1e6
        lines.append(f"{v}: {fig[f'{v}: blocks_read']} blocks read in "
                     f"{fig[f'{v}: read_s'] * 1e3:.0f} ms, {rate:.0f} MB/s "
                     f"({rate / disk:.2f}x the device's rate)")
    lines.append(f"writes left to flush after the request (cold + write): "
                 f"{fig['write_flush_s'] * 1e3:.0f} ms; same first token in every run: "
                 f"{fig['same_first_token']}")
    return "\n".join(lines)


if __name__ == "__main__":
    model_, root_, n_, threads_ = sys.argv[1:5]
    print(json.dumps(_child(model_, None if root_ == "-" else root_, int(n_), int(threads_))))
