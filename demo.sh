#!/usr/bin/env bash
# Offline CPU demo of the main job (about 7 minutes on 2 cores; `make demo` runs it in the project's venv):
#   1. pre-train a small class-conditional DiT (with its own small VAE) on MNIST-5k   (cached after the first run)
#   2. write sklearn's 8x8 digits as image folders: the downstream data set (training split) and a held-out split
#   3. Diff-Tune the small DiT on the training split: memory bank, psi/xi timesteps, checkpoints, validation, card
#   4. one picture of the transfer (target data, the pre-trained model's samples, the fine-tuned model's samples),
#      and how many samples of each model a digits classifier reads as the class they were asked for
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${1:-demo_out}

python -m fixtures.small_dit --output_dir "$OUT/source" --dit_steps 8000
python -m fixtures.offline_data digits "$OUT/digits_train" --limit 1500       # the target's training split
python -m fixtures.offline_data digits "$OUT/digits_held_out" --start 1500   # held out: checks the digits classifier
accelerate launch -q --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  train_diff_tuning_dit.py \
  --pretrained_model_name_or_path "$OUT/source" --dataset "$OUT/digits_train" --output_dir "$OUT/diff_tuning" \
  --method diff_tuning --resolution 16 --no-random_flip --cache_latents \
  --train_batch_size 32 --learning_rate 1e-3 --lr_scheduler cosine --max_train_steps 3000 \
  --memory_bank_size 320 --memory_bank_batch_size 64 \
  --checkpointing_steps 1000 --validation_steps 1000 --num_validation_images 10 --validation_inference_steps 25 \
  --resume_from_checkpoint latest

python -m fixtures.transfer_figure --data "$OUT/digits_train" --held_out "$OUT/digits_held_out" \
  --source "$OUT/source" --tuned "$OUT/diff_tuning" --output "$OUT/transfer.png"

echo
echo "Fine-tuned DiTPipeline: $OUT/diff_tuning (samples.png, README.md; TensorBoard logs in $OUT/diff_tuning/logs)"
echo "The transfer in one picture (target data, pre-trained samples, fine-tuned samples): $OUT/transfer.png"
