#!/usr/bin/env bash
# Creates .venv and installs flux2-bench into it.
#   scripts/install.sh          runtime only
#   scripts/install.sh test     runtime + test dependencies (diffusers, bitsandbytes, OCR, ...)
# torch is installed first and pinned through a constraints file, so no later dependency can swap
# it: on a machine without an NVIDIA GPU that keeps the CPU build (no CUDA wheels are downloaded);
# with a GPU (nvidia-smi answers) the CUDA build is taken.
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-}"
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
CPU_TORCH="2.13.0"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  # GPU: the CUDA build. An already working CUDA torch (>= 2.11) is kept.
  if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    "${pip[@]}" "torch>=2.11"
  fi
else
  # CPU: the CPU build only. Set FLUX2_TORCH_INDEX to a CPU wheel index where the default
  # index would serve a CUDA build.
  if [ -n "${FLUX2_TORCH_INDEX:-}" ]; then
    "${pip[@]}" --index-url "$FLUX2_TORCH_INDEX" "torch==$CPU_TORCH"
  else
    "${pip[@]}" "torch==$CPU_TORCH"
  fi
fi

tv=$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])')
echo "torch==$tv" > "$VENV/constraints.txt"
if [ "$extra" = "test" ]; then target=".[test]"; else target="."; fi
"${pip[@]}" -c "$VENV/constraints.txt" -e "$target"
echo "installed flux2-bench into $VENV (torch $tv)"
