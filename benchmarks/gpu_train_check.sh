#!/usr/bin/env bash
# The trainer's GPU path (NCCL, bf16, ZeRO), run after gpu_check.sh on the same one-GPU machine:
# a tiny hybrid trained 4 steps on this repository's own text at ZeRO-2, stopped at step 2, then
# resumed at ZeRO-3 (another layout: the layout-free weights and AdamW moments), which must
# restore the optimizer. Checks what CPU runs (gloo) cannot: every collective's tensors on the
# device, DeepSpeed's ZeRO-2 / ZeRO-3 fragments on CUDA. Bounded to 5 minutes; on a CPU-only
# machine it runs the same on gloo (DS_ACCELERATOR=cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$(dirname "${PYTHON:-.venv/bin/python}")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/text"
LC_ALL=C tr -cd '\11\12\40-\176' < README.md > "$work/text/readme.txt"
"$BIN/megaxatl" prepare-data "$work/text" --train-spm 500 --seq-len 64 --out "$work/data" > /dev/null
run=(timeout 150 "$BIN/torchrun" --nproc_per_node 1 launchers/pretrain.py --config configs/tiny_hybrid.json
     --set model.vocab_size=512 --set data.train_shards="$work/data" --set data.seq_len=64
     --set train.steps=4 --set train.save_interval=2 --set train.dtype=bf16 --set train.out_dir="$work/run")
"${run[@]}" --set parallel.zero_stage=2 --stop-after 2
"${run[@]}" --set parallel.zero_stage=3
grep -q '"optimizer": "restored (layout-free)"' "$work/run/metrics.jsonl" \
    || { echo "gpu_train_check: the ZeRO-2 -> ZeRO-3 resume did not restore the optimizer" >&2; exit 1; }
grep '"kind": "train"' "$work/run/metrics.jsonl" | tail -4
echo "gpu_train_check: ok"
