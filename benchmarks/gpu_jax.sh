#!/usr/bin/env bash
# One prepared GPU run on JAX, over within LIMIT_S seconds of wall clock (470 by default:
# under 8 minutes): the machine, the compiled AT step, then a pilot of PGD-AT at the paper's
# scale (benchmarks/gpu_jax.py says what each part does; docs/BENCHMARKS.md, "GPU", how to
# run it).
#
#   bash benchmarks/gpu_jax.sh OUT_DIR CIFAR10_ARCHIVE            # on the GPU machine
#   TINY=1 bash benchmarks/gpu_jax.sh /tmp/gpu_tiny ARCHIVE       # the same path, tiny, on a CPU
#
# PYTHON (python3) runs it. Wheels in WHEELS (benchmarks/wheels/ by default: keras, namex and
# optree, where the machine lacks them) are installed first, with no index, into a temporary
# folder that goes on PYTHONPATH. TensorFlow is not needed.
set -euo pipefail
OUT=${1:?usage: gpu_jax.sh OUT_DIR CIFAR10_ARCHIVE}
DATA=${2:?usage: gpu_jax.sh OUT_DIR CIFAR10_ARCHIVE}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")" && pwd)
WHEELS=${WHEELS-$HERE/wheels}
mkdir -p "$OUT"

SITE=
if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  SITE=$(mktemp -d)
  trap 'rm -rf "$SITE"' EXIT
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl
fi
export PYTHONPATH="${SITE:+$SITE:}$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1

ARGS=() LIMIT=470
if [ "${TINY:-0}" = 1 ]; then
  # Seconds of work on a CPU; compiling is nearly all the time, and XLA's costlier LLVM
  # passes a third of that (these flags lower them; the CPU only). The budget is large:
  # TINY checks the path, not the time.
  ARGS=(--model=resnet10 --width=0.0625 --batch_size=16 --dtypes=bfloat16 --activations=relu,sparta
        --rounds=2 --steps=1 --pilot_arms=relu,sparta --pilot_max_train=64
        --pilot_max_test=32 --pilot_max_epochs=1 --pilot_min_epochs=1 --eval_pgd_steps=2
        --autoattack_examples=16 --autoattack_iterations=2 --autoattack_queries=3
        --nosparta_depthwise)
  export XLA_FLAGS="--xla_backend_optimization_level=1 --xla_llvm_disable_expensive_passes=true"
  LIMIT=1800
fi
LIMIT_S=${LIMIT_S:-$LIMIT}

# gpu_jax.py keeps to --budget_s by itself and writes its report after each part; timeout
# is the backstop (SIGKILL 5 s after SIGTERM), with 15 s for the last write.
LEFT=$((LIMIT_S - SECONDS))
timeout -k 5 "$LEFT" "$PY" "$HERE/gpu_jax.py" --output_dir="$OUT" --dataset="$DATA" \
  --budget_s=$((LEFT - 15)) ${ARGS[@]+"${ARGS[@]}"} 2>&1 | tee "$OUT/gpu_jax.log"
