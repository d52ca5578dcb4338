#!/usr/bin/env bash
# The GPU benchmark (bench/gpu_bench.py) on a lent GPU machine: no network, torch + transformers only.
#
#   bash bench/gpu_check.sh --prepare   # HERE, once: pydantic & co. as wheels into bench/.wheels (~3 MB)
#   bash bench/gpu_check.sh [ARGS]      # THERE, from the repo root: ARGS go to gpu_bench.py (--only, --batches, ...)
#
# There, the wheels (when carried) are installed into /tmp/ifw-site so that ifw's decode path imports
# for real; without them gpu_bench.py gives the modules that need pydantic stand-ins (and says so in
# every row). Results go to $OUT/gpu-bench (the folder that comes back), else bench/results/gpu-bench.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=bench/.wheels

if [[ ${1:-} == --prepare ]]; then
    # The versions this checkout's venv runs (the project's pins), for the lent machine's Python.
    PY=${PYTHON:-.venv/bin/python}
    pins=$("$PY" - <<'EOF'
import importlib.metadata as m
names = "pydantic pydantic-core pydantic-settings python-dotenv annotated-types typing-inspection typing-extensions"
print(" ".join(f"{n}=={m.version(n)}" for n in names.split()))
EOF
) || exit 1
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
        --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" $pins
fi

PY=${PYTHON:-$(command -v python3 || command -v python)}
dest=${OUT:-bench/results}/gpu-bench
mkdir -p "$dest"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    "$PY" -c 'import sys, torch, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, torch.cuda.is_available(), "transformers", transformers.__version__)'
    "$PY" -c 'import flash_attn; print("flash_attn", flash_attn.__version__)' 2>/dev/null || echo "no flash_attn"
} 2>&1 | tee "$dest/env.txt"
if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ifw-site \
        "$WHEELS"/*.whl; then
        export PYTHONPATH=/tmp/ifw-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "the wheels in $WHEELS did not install: ifw.runner.errors/audio get stand-ins"
    fi
fi
# gpu_bench.py keeps to its --deadline (390 s); this only guards against a hang past it.
timeout -k 10 450 "$PY" bench/gpu_bench.py --out "$dest" "$@"
