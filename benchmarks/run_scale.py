"""Fold time and peak memory on large synthetic models, against the copy floor.

For each size: generate a Llama-shaped fp16 model (tensor by tensor), then measure, each in
its own process, wall time and peak RSS of

* ``cp`` of the model and data file + ``sync`` (the physical floor: every byte read and written once),
* ``flashnorm-onnx optimize`` with ``--no-verify`` (the streamed fold alone), ``--verify algebraic``
  and ``--verify subgraph`` (the executed check large models get by default, with the algebraic one),
* ``onnx.load`` + ``onnx.save`` of the same model (skipped when it would not fit in memory).

Writes benchmarks/RESULTS_scale.md and .json.

    python -m benchmarks.run_scale [--gb 2 16] [--dir /path/with/space]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from models import synthetic

HERE = Path(__file__).parent
VERIFY_FLAGS = {"no_verify": ["--no-verify"], "optimize": ["--verify", "algebraic"],
                "subgraph": ["--verify", "subgraph"]}


def measure(cmd: list[str]) -> dict:
    wrapper = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        f"p = subprocess.run({cmd!r}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'rc': p.returncode, 'err': p.stderr[-500:], 'seconds': dt,"
        " 'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def drop_caches() -> None:
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def run_size(gb: float, work: Path) -> dict:
    dims = synthetic.shape_for_bytes(int(gb * 2**30), "float16", hidden=4096 if gb >= 8 else 2048)
    src = work / f"synth_{gb:g}gb" / "model.onnx"
    t = time.perf_counter()
    synthetic.build(src, *dims, dtype="float16")
    gen = time.perf_counter() - t
    data = src.parent / (src.name + ".data")
    size = data.stat().st_size + src.stat().st_size
    row = {"gb": gb, "bytes": size, "dims": dims, "generate_seconds": gen}
    cp_dir = work / "cp"
    cp_dir.mkdir(exist_ok=True)
    drop_caches()
    row["cp"] = measure(["bash", "-c", f"cp {src} {data} {cp_dir}/ && sync"])
    shutil.rmtree(cp_dir)
    out = work / "folded" / "model.onnx"
    for key, flags in VERIFY_FLAGS.items():
        drop_caches()
        row[key] = measure([sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(src), "-o", str(out),
                            *flags, "-q"])
        shutil.rmtree(out.parent, ignore_errors=True)
    total_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 2.2 * size < total_ram:
        drop_caches()
        saved = work / "saved"
        saved.mkdir(exist_ok=True)
        row["onnx_load_save"] = measure([
            sys.executable, "-c",
            "import onnx,sys; m=onnx.load(sys.argv[1]); onnx.save_model(m, sys.argv[2], save_as_external_data=True,"
            " location='model.onnx.data')", str(src), str(saved / "model.onnx")])
        shutil.rmtree(saved, ignore_errors=True)
    else:
        row["onnx_load_save"] = {"skipped": f"needs ~{2 * size / 2**30:.0f} GB RAM, machine has {total_ram / 2**30:.0f} GB"}
    shutil.rmtree(src.parent, ignore_errors=True)
    return row


def _cells(m: dict | None, cp: dict, rss: bool) -> str:
    if not m:
        return "- | - | " + ("- | " if rss else "")
    rc = "" if m["rc"] == 0 else f" (rc {m['rc']})"
    cells = f"{m['seconds']:.1f}{rc} | {m['seconds'] / cp['seconds']:.2f} | "
    return cells + (f"{m['peak_rss'] / 2**30:.2f} GB | " if rss else "")


def write_results(rows: list[dict], command: str) -> None:
    (HERE / "RESULTS_scale.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Fold time and peak memory on large synthetic models",
        "",
        f"Command: `{command}`",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GB RAM, Python {platform.python_version()}",
        "Page cache dropped before each measurement when permitted. Ratios are against `cp` + `sync` of the same files.",
        "",
        "| model | cp+sync s | optimize (algebraic) s | / cp | peak RSS | --no-verify s | / cp | --verify subgraph s | / cp | peak RSS | onnx.load+save s | load+save / cp | load+save peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cp, opt, ls = r["cp"], r["optimize"], r["onnx_load_save"]
        ls_s = f"{ls['seconds']:.1f}" if "seconds" in ls else ls.get("skipped", "-")
        ls_ratio = f"{ls['seconds'] / cp['seconds']:.2f}" if "seconds" in ls else "-"
        ls_rss = f"{ls['peak_rss'] / 2**30:.2f} GB" if "peak_rss" in ls else "-"
        lines.append(
            f"| {r['bytes'] / 2**30:.2f} GB fp16 (hidden {r['dims'][0]}, {r['dims'][2]} layers) | {cp['seconds']:.1f} | "
            f"{opt['seconds']:.1f}{'' if opt['rc'] == 0 else ' (rc ' + str(opt['rc']) + ')'} | "
            f"{opt['seconds'] / cp['seconds']:.2f} | {opt['peak_rss'] / 2**30:.2f} GB | "
            + "".join(_cells(r.get(k), cp, rss=(k == "subgraph")) for k in ("no_verify", "subgraph"))
            + f"{ls_s} | {ls_rss and ls_ratio} | {ls_rss} |"
        )
    lines.append("")
    (HERE / "RESULTS_scale.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, nargs="+", default=[2.0, 16.0])
    parser.add_argument("--dir", default=None, help="scratch folder (needs ~3x the largest size free)")
    args = parser.parse_args(argv)
    work = Path(args.dir or tempfile.mkdtemp(prefix="flashnorm-scale-", dir=str(HERE.parent / "build")
                                                 if (HERE.parent / "build").exists() else None))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for gb in args.gb:
            free = shutil.disk_usage(work).free
            if free < 3.2 * gb * 2**30:
                print(f"skipping {gb} GB: only {free / 2**30:.0f} GB free in {work}")
                continue
            rows.append(run_size(gb, work))
            write_results(rows, "python -m benchmarks.run_scale " + " ".join(sys.argv[1:] if argv is None else argv))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
