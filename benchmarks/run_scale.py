"""Fold time and peak memory on large synthetic models, against the copy floor.

For each model: generate a Llama-shaped fp16 model (tensor by tensor), then measure, each in
its own process and with the page cache dropped first, wall time and peak RSS of

* ``cp`` of the model and data file + ``sync`` (the physical floor: every byte read and written once),
* ``flashnorm-onnx optimize`` with its default verification (for a model too large to run twice in
  memory that is ``subgraph+algebraic``), with ``--no-verify`` (the streamed fold alone), with
  ``--verify algebraic`` and with ``--verify subgraph``,
* ``onnx.load`` + ``onnx.save`` of the same model (skipped when it would not fit in memory),

and, in one more run of the default verification, where the time goes: the fold pass (its
overflow check reads every weight it folds), the streamed write (reading, folding, writing,
kernel copies), the verification, and the publish (fsync and rename).

Models: ``2gb`` (hidden 2048, tied embedding: about 2 GB) and ``llama3-8b`` (Llama-3-8B's exact
shape: hidden 4096, 32 layers, intermediate 14336, 8 KV heads, vocabulary 128256, untied output
layer: 16.1 GB). Writes benchmarks/RESULTS_scale.md and .json.

    python -m benchmarks.run_scale [--models 2gb llama3-8b] [--dir /path/with/space]
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

import numpy as np

from models import synthetic

HERE = Path(__file__).parent
VERIFY_FLAGS = {"default": [], "no_verify": ["--no-verify"], "algebraic": ["--verify", "algebraic"],
                "subgraph": ["--verify", "subgraph"]}
LABELS = {"default": "optimize (default verification)", "no_verify": "--no-verify",
          "algebraic": "--verify algebraic", "subgraph": "--verify subgraph"}
MODELS = ("2gb", "llama3-8b")


def measure(cmd: list[str]) -> dict:
    wrapper = (
        "import resource, subprocess, sys, json, time\n"
        "t = time.perf_counter()\n"
        f"p = subprocess.run({cmd!r}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)\n"
        "dt = time.perf_counter() - t\n"
        "v = [ln for ln in p.stdout.splitlines() if ln.startswith('verification')]\n"
        "print(json.dumps({'rc': p.returncode, 'verification': v[-1] if v else '', 'err': p.stderr[-500:], 'seconds': dt,"
        " 'peak_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", wrapper], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def drop_caches() -> bool:
    subprocess.run(["sync"])
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def build_model(name: str, src: Path) -> tuple:
    if name == "2gb":
        dims = synthetic.shape_for_bytes(2 * 2**30, "float16", hidden=2048)
        synthetic.build(src, *dims, dtype="float16")
        return dims, "tied embedding"
    dims = synthetic.SHAPES[name]
    synthetic.build(src, *dims, dtype="float16")
    _untie_output_layer(src, dims)
    return dims, "untied output layer"


def _untie_output_layer(path: Path, dims: tuple) -> None:
    """Give the synthetic model its own ``lm_head.weight`` [hidden, vocab] (Llama-3-8B does not
    tie it): appended to the data file, read by the final MatMul in place of the embedding's
    Transpose."""
    import onnx

    hidden, vocab = dims[0], dims[3]
    data = path.parent / (path.name + ".data")
    offset = data.stat().st_size
    rng = np.random.default_rng(7)
    pool = (rng.standard_normal(1 << 22) * 0.02).astype(np.float16)
    count = hidden * vocab
    with open(data, "ab") as f:
        done = 0
        while done < count:
            start = int(rng.integers(0, pool.size // 2))
            n = min(count - done, pool.size - start)
            f.write(pool[start:start + n].tobytes())
            done += n
        f.flush()
        os.fsync(f.fileno())
    proto = onnx.load_model(str(path), load_external_data=False)
    tensor = onnx.TensorProto(name="lm_head.weight", data_type=onnx.TensorProto.FLOAT16, dims=[hidden, vocab])
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(count * 2))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    proto.graph.initializer.append(tensor)
    nodes = [n for n in proto.graph.node if not (n.op_type == "Transpose" and n.output[0] == "lm_head.weight_t")]
    for n in nodes:
        for i, name in enumerate(n.input):
            if name == "lm_head.weight_t":
                n.input[i] = "lm_head.weight"
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    path.write_bytes(proto.SerializeToString())


def run_model(name: str, work: Path) -> dict:
    src = work / f"synth_{name}" / "model.onnx"
    t = time.perf_counter()
    dims, note = build_model(name, src)
    gen = time.perf_counter() - t
    data = src.parent / (src.name + ".data")
    size = data.stat().st_size + src.stat().st_size
    row = {"model": name, "bytes": size, "dims": list(dims), "note": note, "generate_seconds": gen}
    cp_dir = work / "cp"
    cp_dir.mkdir(exist_ok=True)
    row["cache_dropped"] = drop_caches()
    row["cp"] = measure(["bash", "-c", f"cp {src} {data} {cp_dir}/ && sync"])
    shutil.rmtree(cp_dir)
    out = work / "folded" / "model.onnx"
    for key, flags in VERIFY_FLAGS.items():
        drop_caches()
        row[key] = measure([sys.executable, "-m", "flashnorm_onnx.cli", "optimize", str(src), "-o", str(out),
                            *flags])
        shutil.rmtree(out.parent, ignore_errors=True)
    # the copy again after the folds: the disk's speed drifts on a shared VM; the ratios use the mean
    cp_dir.mkdir(exist_ok=True)
    drop_caches()
    first = row["cp"]
    again = measure(["bash", "-c", f"cp {src} {data} {cp_dir}/ && sync"])
    shutil.rmtree(cp_dir)
    row["cp"] = {**first, "seconds": (first["seconds"] + again["seconds"]) / 2,
                 "before": first["seconds"], "after": again["seconds"]}
    drop_caches()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run_scale", "--profile-one", str(src), str(out)],
                          capture_output=True, text=True)
    row["profile"] = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {
        "error": proc.stderr[-500:]}
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


def profile_one(src: str, out: str) -> dict:
    """One ``optimize`` with the default verification, in this process, timed phase by phase."""
    t0 = time.perf_counter()
    from flashnorm_onnx.pipeline import api
    from flashnorm_onnx.io import model_io
    from flashnorm_onnx.io import publish
    from flashnorm_onnx.io import tensor_io
    from flashnorm_onnx.passes import flashnorm_fold

    phases: dict[str, float] = {}

    def timed(key, f):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                phases[key] = phases.get(key, 0.0) + time.perf_counter() - t
        return wrapper

    model_io.write_atomic = timed("write", model_io.write_atomic)
    flashnorm_fold.FlashNormFoldPass.call = timed("fold pass", flashnorm_fold.FlashNormFoldPass.call)
    api._verify = timed("verify", api._verify)
    publish.StagedOutput.commit = timed("publish", publish.StagedOutput.commit)
    imported = time.perf_counter() - t0
    report = api.optimize(src, out)
    total = time.perf_counter() - t0
    return {"total": total, "import": imported, **phases,
            "write_detail": dict(tensor_io.STATS), "verification": report.verification.method}


def _goals(r: dict) -> str:
    cp = r["cp"]["seconds"]
    if r["model"] == "llama3-8b":
        d = r["default"]
        ok = d.get("rc") == 0 and d["seconds"] <= 1.3 * cp and d["peak_rss"] <= 0.5 * 2**30
        return (f"`llama3-8b` default verification <= 1.3x cp+sync and <= 0.5 GB: "
                f"{d['seconds'] / cp:.2f}x, {d['peak_rss'] / 2**30:.2f} GB, {'met' if ok else 'NOT met'}")
    n = r["no_verify"]
    ok = n.get("rc") == 0 and n["seconds"] <= 1.5 * cp
    return f"`{r['model']}` --no-verify <= 1.5x cp+sync: {n['seconds'] / cp:.2f}x, {'met' if ok else 'NOT met'}"


def _s(m: dict | None, cp: dict) -> str:
    if not m or "seconds" not in m:
        return (m or {}).get("skipped", "-") + " | - | - |"
    rc = "" if m["rc"] == 0 else f" (rc {m['rc']})"
    return f"{m['seconds']:.1f}{rc} | {m['seconds'] / cp['seconds']:.2f} | {m['peak_rss'] / 2**30:.2f} GB |"


def write_results(rows: list[dict], command: str) -> None:
    (HERE / "RESULTS_scale.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    lines = [
        "# Fold time and peak memory on large synthetic models",
        "",
        f"Command: `{command}` (`make bench-scale`)",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GB RAM, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}",
        "Page cache dropped before each measurement"
        + ("" if all(r.get("cache_dropped") for r in rows) else " (not permitted here: caches were warm)")
        + ". Seconds, ratio to `cp` + `sync` of the same files in the same run (the mean of one copy before "
        "the folds and one after), peak RSS. One run each: on a shared VM the disk's speed varies from run "
        "to run, so compare ratios within a row.",
        "",
        "| model | cp+sync s (before, after) | " + " | ".join(f"{LABELS[k]} s | / cp | peak RSS" for k in VERIFY_FLAGS)
        + " | onnx.load+save s | / cp | peak RSS |",
        "|---|---|" + "---|---|---|" * (len(VERIFY_FLAGS) + 1),
    ]
    for r in rows:
        cp = r["cp"]
        h, inter, layers, vocab, kv = r["dims"]
        lines.append(
            f"| {r['bytes'] / 1e9:.1f} GB fp16 `{r['model']}` (hidden {h}, {layers} layers, intermediate {inter}, "
            f"vocab {vocab}, {r['note']}) | {cp['seconds']:.1f} ({cp.get('before', cp['seconds']):.1f}, "
            f"{cp.get('after', cp['seconds']):.1f}) | "
            + " ".join(_s(r.get(k), cp) for k in VERIFY_FLAGS) + " " + _s(r.get("onnx_load_save"), cp)
        )
    lines += ["", "Goals (issue 13): " + "; ".join(_goals(r) for r in rows)]
    lines += ["", "Default verification per model: "
              + "; ".join(f"`{r['model']}`: {r['default'].get('verification', '')}" for r in rows), ""]
    lines += ["## Where the time goes (default verification, one more run)", "",
              "| model | total s | start-up (imports) | fold pass (decide) "
              "| write (stream) | of which read | fold | write | kernel copy | waiting for the disk | verify | publish (fsync, rename) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r.get("profile", {})
        if "total" not in p:
            lines.append(f"| `{r['model']}` | {p.get('error', 'not measured')[:80]} |" + " |" * 10)
            continue
        d = p["write_detail"]
        lines.append(
            f"| `{r['model']}` | {p['total']:.1f} | {p['import']:.1f} | {p.get('fold pass', 0):.1f} | "
            f"{p.get('write', 0):.1f} | {d['read']:.1f} | {d['fold']:.1f} | {d['write']:.1f} | {d['copy']:.1f} | "
            f"{d['wait']:.1f} | {p.get('verify', 0):.1f} | {p.get('publish', 0):.1f} |")
    lines += [
        "",
        "Read, fold and wait are the folding thread (read: `pread` of the weights it folds, in the write; "
        "wait: for a free buffer, i.e. for the writer); write and kernel copy are the writer thread, which runs "
        "beside it (direct writes of folded blocks, `copy_file_range` of unchanged tensors; with direct writes, "
        "unchanged tensors are read by the folding thread and written directly too).",
        "",
        "Each byte is read once and written once: the overflow check (is every g·w representable?) runs on "
        "the blocks the write reads (a product out of range abandons the staged output and the fold is planned "
        "again without that norm, with the reason the eager check gives), and the subgraph check takes the "
        "sampled columns of each folded `[K, N]` weight from the buffers the writer wrote, while the algebraic "
        "check reads sampled rows back from the written file. What is left beyond the copy: the verification "
        "(ONNX Runtime sessions for every norm and linear, and the read-back), the start-up (imports; the "
        "'start-up' column counts flashnorm_onnx's imports in-process, the interpreter's own start is outside "
        "it), and, for a model that fits in memory, the whole-model ONNX Runtime comparison of the default check.",
        "",
    ]
    (HERE / "RESULTS_scale.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--dir", default=None, help="scratch folder (needs ~3x the largest model free)")
    parser.add_argument("--profile-one", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_one:
        print(json.dumps(profile_one(*args.profile_one)))
        return
    build = HERE.parent / "build"
    work = Path(args.dir or tempfile.mkdtemp(prefix="flashnorm-scale-", dir=str(build) if build.exists() else None))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    needs = {"2gb": 2.2e9, "llama3-8b": 16.1e9}
    try:
        for name in args.models:
            free = shutil.disk_usage(work).free
            if free < 3.1 * needs[name]:
                print(f"skipping {name}: only {free / 1e9:.0f} GB free in {work}")
                continue
            rows.append(run_model(name, work))
            write_results(rows, "python -m benchmarks.run_scale " + " ".join(sys.argv[1:] if argv is None else argv))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
