#!/usr/bin/env bash
# The GPU checks of the merge-speed issue, prepared as one short run on a lent device
# machine (H100/H200; see benchmarks/RESULTS.md for what they measure):
#
#   scripts/gpu_checks.sh prepare
#       here, with PyPI reachable: downloads the cp312 wheels the device image lacks, at the
#       versions installed in .venv, and copies the built tiny zoo, into .gpu/ (ignored
#       through .git/info/exclude; ~40 MB, under the device tool's 64 MiB carry limit)
#   device run:  command "bash scripts/gpu_checks.sh run", carry [".gpu"], timeout_s 570
#       there: installs the wheels under /tmp/site, then runs, each step under its own
#       timeout and logged to $OUT/<step>.log:
#         1. the CUDA tests: tests/models/test_placement.py and the CPU-vs-GPU mask test;
#         2. merge throughput, 1.2B parameters (hidden 2048, 16 layers), bf16, with the
#            merge+save and export columns;
#         3. merge throughput, 7B-shaped tensors (hidden 4096, MLP 11008, vocab 32000) in 8
#            of Llama-2-7B's 32 layers, bf16, in-memory merge only: four full 7B
#            checkpoints (54 GB in bf16) would not fit the machine's disk beside the image.
#            Per-tensor throughput is what the shape sets; the per-candidate time of the
#            whole 7B model is its parameter count over the measured Mparam/s.
#
# Not covered, and why: vLLM on CUDA and Ray with gpus_per_worker (their wheels, ~80 MB for
# ray alone, do not fit the 64 MiB that may travel to the machine, which reaches no index).
set -euo pipefail
cd "$(dirname "$0")/.."

# mergesearch's dependencies (and their own) that the device image does not hold
PACKAGES="optuna sqlalchemy alembic colorlog mako cma pymoo autograd alive-progress about-time
graphemeu dill deprecated wrapt moocore pydantic pydantic-core annotated-types
typing-inspection"

prepare() {
    local py=.venv/bin/python
    [ -x "$py" ] || { echo "prepare needs the project's .venv (README's test command)"; exit 2; }
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/whl .gpu/zoo
    local pins=()
    for name in $PACKAGES; do
        version=$("$py" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')
        [ -n "$version" ] && pins+=("$name==$version")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl "${pins[@]}"
    # the tiny zoo the placement test's resume case uses (built here by the test suite)
    zoo=$("$py" -c "from mergesearch.zoo import default_zoo_dir, ZooConfig; print(default_zoo_dir(ZooConfig(), 0))")
    if [ -d "$zoo" ]; then
        cp -r "$zoo" .gpu/zoo/
    else
        echo "no built zoo at $zoo: the device builds its own (minutes)"
    fi
    du -sh .gpu
}

run() {
    local out=${OUT:-/tmp/gpu_checks}
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .gpu/whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" MERGESEARCH_ZOO="$PWD/.gpu/zoo" PYTHONUNBUFFERED=1
    export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
        python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
        nproc; df -h /tmp | tail -1
    } > "$out/device.log" 2>&1 || true
    timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
        tests/models/test_placement.py \
        "tests/merging/test_methods.py::test_random_masks_are_the_same_on_cpu_and_gpu" \
        > "$out/tests.log" 2>&1 || echo "tests: rc $?" >> "$out/tests.log"
    timeout 200 python3 benchmarks/merge_throughput.py --device cuda --dtype bfloat16 \
        --hidden 2048 --layers 16 --no-mergekit --repeats 3 \
        > "$out/throughput_1b.log" 2>&1 || echo "1.2B: rc $?" >> "$out/throughput_1b.log"
    timeout 180 python3 benchmarks/merge_throughput.py --device cuda --dtype bfloat16 \
        --hidden 4096 --intermediate 11008 --layers 8 --no-save --repeats 3 \
        > "$out/throughput_7b_shape.log" 2>&1 || echo "7B shape: rc $?" >> "$out/throughput_7b_shape.log"
    tail -n 5 "$out"/*.log
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: scripts/gpu_checks.sh prepare | run"; exit 2 ;;
esac
