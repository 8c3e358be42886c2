"""The bench's figures as a Markdown report and PNG plots (matplotlib, the `bench` extra)."""
from __future__ import annotations

from pathlib import Path


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def latency_table(fig: dict) -> list[str]:
    lat = fig["latency"]
    names = list(lat)
    two = len(names) > 1
    rows = [f"| batch 1 | {' | '.join(names)} |" + (" ratio |" if two else ""),
            "| --- |" + " --- |" * (len(names) + two)]

    def row(label, vals, fmt):
        r = f"| {label} | " + " | ".join(fmt.format(v) for v in vals) + " |"
        return r + (f" {_ratio(vals[0], vals[1])} |" if two else "")
    for n in next(iter(lat.values()))["ttft_s"]:
        rows.append(row(f"TTFT, {n}-token prompt (s)", [lat[x]["ttft_s"][n] for x in names],
                        "{:.3f}"))
    rows.append(row("decode (tok/s)", [lat[x]["decode_tok_s"] for x in names], "{:.1f}"))
    rows.append(row("ITL p50 (ms)", [lat[x]["itl_p50_ms"] for x in names], "{:.1f}"))
    rows.append(row("ITL p99 (ms)", [lat[x]["itl_p99_ms"] for x in names], "{:.1f}"))
    return rows


SERVING_COLS = [("concurrency", "streams"), ("throughput_tok_s", "tok/s"),
                ("usd_per_mtok", "$/Mtok"), ("ttft_p50_ms", "TTFT p50 ms"),
                ("ttft_p99_ms", "TTFT p99 ms"), ("itl_p50_ms", "ITL p50 ms"),
                ("itl_p99_ms", "ITL p99 ms"), ("e2e_p50_ms", "E2E p50 ms"),
                ("e2e_p99_ms", "E2E p99 ms"), ("errors", "errors")]


def serving_table(name: str, rows: list[dict]) -> list[str]:
    out = [f"**{name}**", "", "| " + " | ".join(h for _, h in SERVING_COLS) + " |",
           "|" + " --- |" * len(SERVING_COLS)]
    for r in rows:
        out.append("| " + " | ".join(str(r.get(k, "")) for k, _ in SERVING_COLS) + " |")
    return out + [""]


def _qc(v, fmt: str = "{:.1f}") -> str:
    """'quiet / contended (ratio)' of a side_by_side entry."""
    f = lambda x: "-" if x is None else fmt.format(x)   # noqa: E731
    ratio = f" ({v['ratio']:.2f}x)" if v.get("ratio") is not None else ""
    return f"{f(v['quiet'])} / {f(v['contended'])}{ratio}"


def contention_tables(fig: dict) -> list[str]:
    """Quiet vs beside N busy processes, per engine: each cell 'quiet / contended (ratio)'."""
    con = fig["contention"]
    out = [f"## Quiet vs contended ({con['processes']} busy processes)", ""]
    if con.get("latency"):
        names = list(con["latency"])
        metrics = [k for k in next(iter(con["latency"].values()))
                   if k not in ("concurrency", "itl_p99_over_p50",
                                "contended_itl_p99_over_quiet_p50")]
        out += ["| batch 1 | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
        for k in metrics:
            fmt = "{:.3f}" if k.startswith("ttft_") else "{:.1f}"
            out.append(f"| {k} | " + " | ".join(_qc(con["latency"][n][k], fmt) for n in names)
                       + " |")
        out.append("")
    for name, rows in (con.get("serving") or {}).items():
        out += [f"**{name}**, serving", "", "| streams | tok/s | TTFT p50 ms | ITL p50 ms | "
                "ITL p99 ms | ITL p99/p50 | contended ITL p99 / quiet p50 |",
                "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            pp = r["itl_p99_over_p50"]
            out.append(f"| {r['concurrency']} | {_qc(r['throughput_tok_s'])} | "
                       f"{_qc(r['ttft_p50_ms'], '{:.0f}')} | {_qc(r['itl_p50_ms'])} | "
                       f"{_qc(r['itl_p99_ms'])} | {_qc(pp | {'ratio': None}, '{:.2f}')} | "
                       f"{_ratio_cell(r['contended_itl_p99_over_quiet_p50'])} |")
        out.append("")
    return out + ["Each cell: quiet / contended (contended over quiet).", ""]


def _ratio_cell(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def bandwidth_table(fig: dict) -> list[str]:
    """Batch-1 decode against the memory-bandwidth ceiling (bandwidth / weight bytes read per
    token), per engine."""
    bw = fig["bandwidth"]
    out = [f"## Decode against the memory-bandwidth ceiling (read bandwidth measured: "
           f"{bw['read_gbs']:.1f} GB/s)", "",
           "| engine | weights read per token (MB) | ceiling (tok/s) | decode (tok/s) | "
           "share of ceiling |", "| --- | --- | --- | --- | --- |"]
    for name, nbytes in bw["bytes_per_token"].items():
        ceiling = bw["read_gbs"] * 1e9 / nbytes
        got = fig["latency"].get(name, {}).get("decode_tok_s", 0.0)
        out.append(f"| {name} | {nbytes / 1e6:.0f} | {ceiling:.1f} | {got:.1f} | "
                   f"{100 * got / ceiling:.0f}% |")
    return out + [""]


def markdown(fig: dict) -> str:
    out = [f"# ostinato bench: {fig['model']}", "", f"Machine: {fig.get('machine', '?')}", ""]
    if "latency" in fig:
        out += ["## Latency (batch 1, in process)", "", *latency_table(fig), ""]
        if fig.get("batched_tok_s"):
            out += [f"Offline batch of {fig['batch']} (LLM.generate): "
                    f"{fig['batched_tok_s']:.1f} tok/s aggregate.", ""]
        if fig.get("batched_time_shares"):
            out += ["Where that batch's time went (the plan's stopwatch per stage):", "",
                    "| stage | share of wall time |", "| --- | --- |",
                    *(f"| {k} | {100 * v:.1f}% |" for k, v in fig["batched_time_shares"].items()),
                    ""]
    if fig.get("bandwidth") and "latency" in fig:
        out += bandwidth_table(fig)
    if fig.get("speculative"):
        from .speculative import speculative_table
        out += speculative_table(fig)
    if fig.get("structured"):
        from .structured import structured_table
        out += structured_table(fig)
    serving = fig.get("serving") or {}
    if serving:
        how = ""
        if fig.get("arrivals") == "poisson":
            how += f", Poisson arrivals at {fig['request_rate']:g}/s"
        if fig.get("prompt_mix"):
            how += f", prompts of {fig['prompt_mix'][0]}-{fig['prompt_mix'][1]} tokens"
        if fig.get("our_server_flags"):
            how += f"; ours with {' '.join(fig['our_server_flags'])}"
        out += [f"## Serving (streaming /v1/completions, {fig['serving_max_tokens']} tokens per "
                f"request{how}, ${fig['usd_per_hour']}/hour)", ""]
        for name, rows in serving.items():
            out += serving_table(name, rows)
        if len(serving) == 2:
            a, b = serving.values()
            pairs = [(x, y) for x in a for y in b if x["concurrency"] == y["concurrency"]]
            out += ["| streams | throughput ratio " + " / ".join(serving) + " |", "| --- | --- |"]
            out += [f"| {x['concurrency']} | {_ratio(x['throughput_tok_s'], y['throughput_tok_s'])} |"
                    for x, y in pairs] + [""]
    if fig.get("contention"):
        out += contention_tables(fig)
    servers = fig.get("servers") or {}
    if servers or fig.get("llamacpp_peak_rss_mb"):
        out += ["## Start-up and memory", "", "| | start to first answer (s) | peak RSS (MB) |",
                "| --- | --- | --- |"]
        for name, s in servers.items():
            out.append(f"| {name} server | {s['start_to_first_answer_s']:.1f} | "
                       f"{s['peak_rss_mb']:.0f} |")
        if fig.get("llamacpp_peak_rss_mb"):
            out.append(f"| llama.cpp (n_ctx 4096, in process) | "
                       f"{fig['llamacpp_load_s']:.1f} | {fig['llamacpp_peak_rss_mb']:.0f} |")
        out.append("")
    return "\n".join(out)


def plots(fig: dict, out_dir: Path) -> list[Path]:
    """latency.png (TTFT by prompt length) and serving.png (throughput and latency by load);
    an empty list when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    if "latency" in fig:
        f, ax = plt.subplots(figsize=(6, 4))
        for name, v in fig["latency"].items():
            xs = [int(n) for n in v["ttft_s"]]
            ax.plot(xs, list(v["ttft_s"].values()), marker="o", label=name)
        ax.set(xlabel="prompt tokens", ylabel="time to first token (s)", title=fig["model"])
        ax.legend(), ax.grid(alpha=0.3)
        made.append(out_dir / "latency.png")
        f.savefig(made[-1], dpi=110, bbox_inches="tight")
        plt.close(f)
    if fig.get("serving"):
        f, axes = plt.subplots(1, 3, figsize=(15, 4))
        for k, (name, rows) in enumerate(fig["serving"].items()):
            c, color = [r["concurrency"] for r in rows], f"C{k}"     # one colour per engine
            axes[0].plot(c, [r["throughput_tok_s"] for r in rows], marker="o", color=color,
                         label=name)
            for ax, key in ((axes[1], "ttft"), (axes[2], "itl")):
                ax.plot(c, [r[f"{key}_p50_ms"] for r in rows], marker="o", color=color,
                        label=f"{name} p50")
                ax.plot(c, [r[f"{key}_p99_ms"] for r in rows], marker="x", ls="--", color=color,
                        label=f"{name} p99")
        for ax, y in zip(axes, ("output tok/s", "TTFT (ms)", "inter-token latency (ms)")):
            ax.set(xscale="log", xlabel="concurrent streams", ylabel=y)
            ax.set_xticks([r["concurrency"] for r in next(iter(fig["serving"].values()))])
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.legend(fontsize=8), ax.grid(alpha=0.3)
        f.suptitle(f"{fig['model']}: latency vs load")
        made.append(out_dir / "serving.png")
        f.savefig(made[-1], dpi=110, bbox_inches="tight")
        plt.close(f)
    return made
