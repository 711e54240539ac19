"""A profile report for people: latency and op-group tables as text, distributions as a PNG plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flashnorm_onnx.errors import FlashNormError
from flashnorm_onnx.profile.opgroups import GROUPS


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def fmt(row):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(row, widths, align)).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def latency_table(results: list[dict]) -> str:
    headers = ["shape", "provider", "model", "median ms", "p90 ms", "p99 ms", "tokens/s", "B/A", "95% CI", "verdict",
               "pairs, stopped by"]
    rows = []
    for r in results:
        ratio = r["ratio"]
        shape = f"{r['shape']} {r['batch']}x{r['sequence']}" + (f" past {r['past']}" if r["past"] else "")
        for label in ("A", "B"):
            s = r[label]
            first = label == "A"
            rows.append([
                shape if first else "",
                r["provider"] if first else "",
                label,
                f"{s['median_ms']:.3f}",
                f"{s['p90_ms']:.3f}",
                f"{s['p99_ms']:.3f}",
                f"{s['tokens_per_s']:.1f}",
                "" if first else f"{ratio['median']:.3f}",
                "" if first else f"[{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]",
                "" if first else ratio["verdict"],
                "" if first or "pairs" not in r else f"{r['pairs']}, {r['stopped']}",
            ])
    return format_table(headers, rows, align="lllrrrrrrll")


def ops_table(entry: dict, top: int = 12) -> str:
    a, b = entry["A"], entry["B"]
    lines = [f"time by group, ms per run ({entry['shape']}, {entry['provider']}):"]
    rows = []
    for g in GROUPS:
        va, vb = a["by_group_ms"][g], b["by_group_ms"][g]
        rows.append([g, f"{va:.3f}", f"{vb:.3f}", f"{vb - va:+.3f}", _pct(va, a["kernel_total_ms"]),
                     _pct(vb, b["kernel_total_ms"])])
    rows.append(["kernels total", f"{a['kernel_total_ms']:.3f}", f"{b['kernel_total_ms']:.3f}",
                 f"{b['kernel_total_ms'] - a['kernel_total_ms']:+.3f}", "100%", "100%"])
    if a.get("run_total_ms") is not None and b.get("run_total_ms") is not None:
        rows.append(["whole run", f"{a['run_total_ms']:.3f}", f"{b['run_total_ms']:.3f}",
                     f"{b['run_total_ms'] - a['run_total_ms']:+.3f}", "", ""])
    lines.append(format_table(["group", "A", "B", "B-A", "A %", "B %"], rows))
    ops = sorted(set(a["by_op_ms"]) | set(b["by_op_ms"]),
                 key=lambda k: -max(a["by_op_ms"].get(k, 0.0), b["by_op_ms"].get(k, 0.0)))
    rows = []
    for op in ops[:top]:
        va, vb = a["by_op_ms"].get(op, 0.0), b["by_op_ms"].get(op, 0.0)
        rows.append([op, f"{va:.3f}", f"{vb:.3f}", f"{vb - va:+.3f}"])
    if len(ops) > top:
        rest_a = sum(a["by_op_ms"].get(k, 0.0) for k in ops[top:])
        rest_b = sum(b["by_op_ms"].get(k, 0.0) for k in ops[top:])
        rows.append([f"({len(ops) - top} more)", f"{rest_a:.3f}", f"{rest_b:.3f}", f"{rest_b - rest_a:+.3f}"])
    lines.append("")
    lines.append(f"time by op type, ms per run ({entry['shape']}, {entry['provider']}):")
    lines.append(format_table(["op type", "A", "B", "B-A"], rows))
    return "\n".join(lines)


def _pct(v: float, total: float) -> str:
    return f"{100 * v / total:.1f}%" if total > 0 else "-"


def write_plot(report: dict, path: str | Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise FlashNormError(
            "--plot needs matplotlib: pip install 'flashnorm-onnx[plot]'"
        ) from None
    results = report["results"]
    ops = report.get("ops") or []
    ncols = max(len(results), 1)
    nrows = 2 if ops else 1
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.5 * ncols, 4 * nrows), squeeze=False)
    for i, r in enumerate(results):
        ax = axes[0][i]
        data = [r["A"]["samples_ms"], r["B"]["samples_ms"]]
        ax.boxplot(data, showfliers=True)
        ax.set_xticks([1, 2], ["A (baseline)", "B"])
        for j, d in enumerate(data, start=1):
            jitter = np.random.default_rng(j).uniform(-0.08, 0.08, len(d))
            ax.plot(np.full(len(d), j) + jitter, d, ".", alpha=0.35, markersize=3)
        lo, hi = r["ratio"]["ci95"]
        ax.set_title(f"{r['shape']} {r['batch']}x{r['sequence']}"
                     + (f" past {r['past']}" if r["past"] else "")
                     + f" [{r['provider']}]\nB/A {r['ratio']['median']:.3f} [{lo:.3f}, {hi:.3f}]", fontsize=9)
        ax.set_ylabel("latency (ms)")
    if not results:
        axes[0][0].text(0.5, 0.5, "no results", ha="center")
    for i, entry in enumerate(ops[:ncols]):
        ax = axes[1][i]
        x = np.arange(2)
        bottom = np.zeros(2)
        for g in GROUPS:
            vals = np.array([entry["A"]["by_group_ms"][g], entry["B"]["by_group_ms"][g]])
            ax.bar(x, vals, bottom=bottom, label=g)
            bottom += vals
        ax.set_xticks(x, ["A", "B"])
        ax.set_ylabel("kernel time per run (ms)")
        ax.set_title(f"by group: {entry['shape']} [{entry['provider']}]", fontsize=9)
        ax.legend(fontsize=7)
    for j in range(len(ops), ncols):
        if nrows > 1:
            axes[1][j].axis("off")
    fig.suptitle(f"A = {Path(report['models']['A']['path']).name}   B = {Path(report['models']['B']['path']).name}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
