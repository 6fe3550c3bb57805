#!/usr/bin/env bash
# Offline CPU demo of the main job (about 3 minutes on 2 cores; `make demo` runs it in the project's venv):
#   1. pre-train a small class-conditional DiT (with its own small VAE) on MNIST-5k   (cached after the first run)
#   2. write sklearn's 8x8 digits as an image folder: the downstream data set
#   3. Diff-Tune the small DiT on it: memory bank, psi/xi timesteps, checkpoints, validation, model card
#   4. one picture of the transfer: target data, the pre-trained model's samples, the fine-tuned model's samples
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${1:-demo_out}

python -m fixtures.small_dit --output_dir "$OUT/source"
python -m fixtures.offline_data digits "$OUT/digits_train" --limit 1500       # the target's training split
python -m fixtures.offline_data digits "$OUT/digits_held_out" --start 1500   # held out: checks the digits classifier
accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_diff_tuning_dit.py \
  --pretrained_model_name_or_path "$OUT/source" --dataset "$OUT/digits_train" --output_dir "$OUT/diff_tuning" \
  --method diff_tuning --resolution 16 --no-random_flip --cache_latents \
  --train_batch_size 32 --learning_rate 5e-4 --max_train_steps 600 \
  --memory_bank_size 320 --memory_bank_batch_size 64 \
  --checkpointing_steps 200 --validation_steps 200 --num_validation_images 10 --validation_inference_steps 25 \
  --resume_from_checkpoint latest

python -m fixtures.transfer_figure --data "$OUT/digits_train" --held_out "$OUT/digits_held_out" \
  --source "$OUT/source" --tuned "$OUT/diff_tuning" --output "$OUT/transfer.png"

echo
echo "Fine-tuned DiTPipeline: $OUT/diff_tuning (samples.png, README.md; TensorBoard logs in $OUT/diff_tuning/logs)"
echo "The transfer in one picture (target data, pre-trained samples, fine-tuned samples): $OUT/transfer.png"
