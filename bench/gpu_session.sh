#!/bin/sh
# The GPU checks in one go, for a session that is lent a device machine (one call, within 10 minutes):
# the gpu-marked tests (tests/test_gpu.py) and bench/gpu.py, their logs and figures written to $OUT.
#
#   here, in a checkout that has the model (make setup, then one test run made build/test-models):
#       bench/gpu_session.sh prepare
#   then one device call from the repository root, carrying .gpu:
#       run(command="sh bench/gpu_session.sh run", carry=[".gpu"], timeout_s=600)
#
# The device machine has torch, transformers, peft, psutil and nvidia-ml-py but no registry, and the
# 98 MB SmolLM2 GGUF is over what travels (64 MiB): `prepare` carries SmolLM2's config and tokenizer,
# and the run makes seeded random weights of that shape there (tests/gpu_model.py). Figures go to
# bench/RESULTS.md ("GPU") with the device's name, by hand.
set -eu
cd "$(dirname "$0")/.."
MODEL=build/test-models/smollm2-135m-safetensors

case "${1:-run}" in
prepare)
    [ -f "$MODEL/config.json" ] || { echo "no $MODEL: run \`make test\` (or tests/test_engine_transformers.py) once first" >&2; exit 1; }
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    rm -rf .gpu && mkdir -p .gpu/smollm2-config
    for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
        [ -f "$MODEL/$f" ] && cp "$MODEL/$f" .gpu/smollm2-config/
    done
    du -sh .gpu
    ;;
run)
    OUT=${OUT:-/tmp/gpu-session}
    mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
    PY=${PYTHON:-python3}
    { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
      "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
    } 2>&1 | tee "$OUT/device.txt"
    rc=0
    # --noconftest: the suite's conftest loads the server's packages, which the device image lacks.
    timeout 330 "$PY" -m pytest -q -p no:cacheprovider --noconftest -o addopts="" -m gpu -rs --basetemp=/tmp/gpu-pt \
        --junitxml="$OUT/gpu-tests.xml" tests/test_gpu.py >"$OUT/gpu-tests.log" 2>&1 || rc=1
    tail -n 40 "$OUT/gpu-tests.log"
    timeout 240 "$PY" bench/gpu.py --json "$OUT/gpu-figures.json" >"$OUT/gpu-bench.log" 2>&1 || rc=1
    cat "$OUT/gpu-bench.log"
    echo "gpu session: exit $rc"
    exit $rc
    ;;
*)
    echo "usage: bench/gpu_session.sh prepare|run" >&2
    exit 2
    ;;
esac
