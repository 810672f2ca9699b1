#!/usr/bin/env bash
# One prepared GPU session of at most ~8 minutes: the step benchmark at full width (mixed
# precision; XLA in its jit/ rows), then PGD-AT of Sparta and of ReLU on full CIFAR-10, each
# for as long as the time allows (killed by `timeout`; its completed epochs are in
# metrics.jsonl and its checkpoints resume).
#
#   bash benchmarks/gpu.sh OUT_DIR CIFAR10_ARCHIVE      # on the GPU machine
#   TINY=1 bash benchmarks/gpu.sh /tmp/gpu_smoke ARCHIVE  # the same steps, tiny, on a CPU
#
# CIFAR10_ARCHIVE: the CIFAR-10 JPEG archive (train/<class>/, test/<class>/); the
# development machines keep it as ../shared/data/cifar10-jpeg.tar.gz.
set -euo pipefail
OUT=${1:?usage: gpu.sh OUT_DIR CIFAR10_ARCHIVE}
DATA=${2:?usage: gpu.sh OUT_DIR CIFAR10_ARCHIVE}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! "$PY" -c "import tensorflow" 2>/dev/null; then
  echo "TensorFlow is not installed for $PY here: nothing to run." | tee "$OUT/device.txt"
  exit 2
fi
"$PY" -c "import tensorflow as tf, keras; print('tensorflow', tf.__version__, 'keras', \
keras.__version__, tf.config.list_physical_devices('GPU'))" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null | tee -a "$OUT/device.txt" || true

if [ "${TINY:-0}" = 1 ]; then
  BENCH=(--widths=0.0625 --batch_size=8 --rounds=1 --steps=1 --noend_to_end)
  TRAIN=(--width_multiplier=0.0625 --max_train=64 --max_test=16 --batch_size=16 --epochs=1)
  BENCH_S=300; TRAIN_S=120
else
  BENCH=(--widths=1.0 --batch_size=256 --rounds=3 --steps=5 --mixed_precision=mixed_float16)
  TRAIN=(--width_multiplier=1.0 --max_test=2000 --batch_size=256 --epochs=30 --lr=0.2
         --lr_schedule=cosine --mixed_precision=mixed_float16 --jit_compile)
  BENCH_S=150; TRAIN_S=130
fi

timeout "$BENCH_S" "$PY" benchmarks/at_step.py "${BENCH[@]}" --output_dir="$OUT/benchmark" \
  > "$OUT/benchmark.log" 2>&1 || echo "benchmark: exit $? (124: out of time)" | tee -a "$OUT/device.txt"
for activation in sparta relu; do
  timeout "$TRAIN_S" "$PY" -m trainers.train --dataset="$DATA" --data_dir="$OUT/data" \
    --activation="$activation" --pgd_steps=3 --eps=8/255 --eval_pgd_steps=20 \
    --checkpoint_every=50 "${TRAIN[@]}" --model_dir="$OUT/$activation" > "$OUT/$activation.log" 2>&1 \
    || echo "$activation: exit $? (124: out of time)" | tee -a "$OUT/device.txt"
done
rm -rf "$OUT/data"
echo "done: $OUT"
