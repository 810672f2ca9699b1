#!/usr/bin/env bash
# Two epochs of PGD-3 AT at a constant learning rate for ResNet-34 arms (seed 0): which of
# them learn under the grid's lr of 0.1 and which stall at chance (docs/TRANSFER.md).
#
#     bash tools/lr_probe.sh DATASET DATA_DIR OUT      (from the repository root)
#
# DATASET: the trainers' --dataset (for example $DATA/cifar10-jpeg.tar.gz). Each probe is a
# sparta-train run in OUT/<name> (metrics.jsonl per epoch, results.json on 200 test images);
# a probe with a results.json is skipped, so the script can be run again after a stop.
# The last probe reads the transfer source's model: `bash tools/fetch_models.sh` first.
set -u
[ $# -eq 3 ] || { sed -n 2,9p "$0"; exit 2; }
dataset=$1 data_dir=$2 out=$3
probe() {
  name=$1; shift
  [ -f "$out/$name/results.json" ] && return
  .venv/bin/sparta-train --dataset="$dataset" --data_dir="$data_dir" --model=resnet34 \
    --max_train=10000 --max_test=200 --width_multiplier=0.25 --epochs=2 --batch_size=128 \
    --lr_schedule=piecewise --lr_decay_epochs= --pgd_steps=3 --eps=8/255 \
    --model_dir="$out/$name" "$@" || exit
}
probe relu_lr0.1 --activation=relu --lr=0.1
probe silu_lr0.1 --activation=silu --lr=0.1
probe sparta_stage_lr0.1 --activation=sparta --sparta_sharing=stage --lr=0.1
probe sparta_layer_lr0.1 --activation=sparta --sparta_sharing=layer --lr=0.1
probe sparta_stage_lr0.05 --activation=sparta --sparta_sharing=stage --lr=0.05
probe sparta_transfer_lr0.1 --activation=sparta --sparta_sharing=stage --lr=0.1 \
  --sparta_from=results/transfer/source_r18w025_stage
