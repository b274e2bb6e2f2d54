#!/usr/bin/env bash
# Install the torch build that fits this machine, at the version pinned in constraints.txt.
#
#   PYTHON=.venv/bin/python bash tools/install_torch.sh     (what `make setup` runs)
#
# Rules, in order:
#   0. the interpreter already has torch==<pinned> (a CPU build does not count on a GPU machine) -> skip
#   1. TORCH_INDEX_URL is set       -> pip install torch==X --index-url "$TORCH_INDEX_URL"
#                                      (e.g. https://download.pytorch.org/whl/cu128)
#   2. a CUDA GPU (nvidia-smi -L), or macOS -> pip install torch==X from PyPI
#                                      (on Linux the PyPI wheel is the CUDA build)
#   3. CPU only                     -> pip install torch==X --no-index: succeeds in seconds when a
#                                      local wheel is reachable through pip's find-links config;
#                                      otherwise fall back to the official CPU wheel index
#                                      https://download.pytorch.org/whl/cpu (small, no CUDA libraries).
#                                      NOTE: that fallback could not be tested where this script was
#                                      written (no network beyond a PyPI mirror).
# Env: PYTHON (default python3), CONSTRAINTS (default <repo>/constraints.txt), TORCH_INDEX_URL.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
CONSTRAINTS="${CONSTRAINTS:-$ROOT/constraints.txt}"

say() { echo "install_torch: $*"; }

ver="$(sed -n -E 's/^[[:space:]]*torch[[:space:]]*==[[:space:]]*([^[:space:];#]+).*/\1/p' "$CONSTRAINTS" | head -n 1)"
if [ -z "$ver" ]; then
    say "no 'torch==' line in $CONSTRAINTS" >&2
    exit 1
fi

gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q .; then
    gpu=1
fi

# Installed version via package metadata (fast: does not import torch).
have="$("$PY" - <<'PYEOF'
import importlib.metadata as md
try:
    print(md.version("torch"))
except md.PackageNotFoundError:
    pass
PYEOF
)"

replace=0
label=""  # local version label of the installed build: cpu, cu128, ... ("" for PyPI's own wheels)
case "$have" in *+*) label="${have#*+}" ;; esac

if [ -n "$have" ] && [ "${have%%+*}" = "$ver" ]; then
    reason=""
    if [ -n "${TORCH_INDEX_URL:-}" ]; then
        want="$(basename "${TORCH_INDEX_URL%/}")"  # .../whl/cu128 -> cu128
        case "$want" in cpu | cu* | rocm* | xpu) [ "$label" = "$want" ] || reason="want the $want build" ;; esac
    elif [ "$gpu" = 1 ] && [ "$label" = cpu ]; then
        reason="a GPU is present"
    fi
    if [ -z "$reason" ]; then
        say "torch $have already installed (pinned $ver); skipping"
        exit 0
    fi
    say "torch $have is installed but $reason: replacing it"
    replace=1
fi

pip_install() { "$PY" -m pip install -c "$CONSTRAINTS" "$@"; }

# torch==X from the given source (extra pip args). Replacing a same-version build needs
# --force-reinstall, done without deps so a failed download leaves the old build in place.
install_torch() {
    if [ "$replace" = 1 ]; then
        pip_install --force-reinstall --no-deps "torch==$ver" "$@"
    fi
    pip_install "torch==$ver" "$@"
}

if [ -n "${TORCH_INDEX_URL:-}" ]; then
    say "path: TORCH_INDEX_URL -> torch==$ver from $TORCH_INDEX_URL"
    # that index also hosts torch's dependencies (filelock, sympy, ... and nvidia-* for CUDA builds)
    install_torch --index-url "$TORCH_INDEX_URL"
elif [ "$gpu" = 1 ] || [ "$(uname -s)" = Darwin ]; then
    if [ "$gpu" = 1 ]; then
        say "path: CUDA GPU found ($(nvidia-smi -L | head -n 1)) -> torch==$ver from PyPI (CUDA build)"
    else
        say "path: macOS -> torch==$ver from PyPI"
    fi
    install_torch
    if [ "$gpu" = 1 ]; then
        cuda="$("$PY" -c 'import torch; print(torch.version.cuda or "")')"
        if [ -z "$cuda" ]; then
            say "WARNING: a GPU is present but the installed torch has no CUDA (a local CPU wheel won?)." >&2
            say "WARNING: rerun with e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128" >&2
        fi
    fi
else
    # The local-wheel attempt must not pull dependencies (they are not local); they are
    # installed right after from the normal index, with torch itself already satisfied.
    if pip_install --no-index --no-deps "torch==$ver" 2>/dev/null; then
        say "path: CPU, local wheel (--no-index) -> torch==$ver"
        pip_install "torch==$ver"
    else
        say "path: CPU, no local wheel -> torch==$ver from https://download.pytorch.org/whl/cpu"
        pip_install "torch==$ver" --index-url https://download.pytorch.org/whl/cpu
    fi
fi

say "installed torch $("$PY" -c 'import importlib.metadata as md; print(md.version("torch"))')"
