#!/usr/bin/env bash
# Reproduce the shipped CPU model in one command: the 60-epoch run from scratch, the validation comparison
# with the weights it replaces, the OOD refit, the evaluation (recorded in weights/model.json) and the README
# results and model card generated from it.
#
#     bash benchmarks/train_shipped.sh [DATA] [MASKS] [RUNS]
#
# Defaults: ../shared/data/brain-tumor-mri, ../shared/data/brain-tumor-mri-masks, runs/shipped.
# The run checkpoints every epoch; run the script again to continue an interrupted run.
# On a 2-core CPU this takes about 1.5 h (see weights/MODEL_CARD.md); OMP_NUM_THREADS=1 keeps it fast
# when the machine does other work too.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/brain-tumor-mri}
MASKS=${2:-../shared/data/brain-tumor-mri-masks}
RUNS=${3:-runs/shipped}
PYTHON=${PYTHON:-python}
OUT="$RUNS/fresh"

# From scratch, 60 epochs at 224 px: the basic augmentation plus the stress-relevant part of the strong
# recipe (down-up sampling to 4x, noise, blur) and the CAM-in-mask loss at weight 0.3 (off for 2.5 epochs,
# ramped in over the next 2.5); SGD lr 0.05 for batch 64, 3 warm-up epochs, cosine decay.
train=("$PYTHON" -m tumor_xai.train --data "$DATA" --out "$OUT" --batch-size 64 --image-size 224 --device cpu
  --seed 0 --half --aug basic --aug-set resolution=3 --aug-set noise=0.06 --aug-set blur=1.0 --masks "$MASKS"
  --cam-loss-weight 0.3 --cam-warmup-epochs 5 --epochs 60)
if [ -f "$OUT/model.json" ]; then
  echo "$OUT is done"
elif [ -f "$OUT/last/train_state.pt" ]; then
  "${train[@]}" --resume
else
  "${train[@]}"
fi
# How the run compares on validation with the weights it replaces (the gate a new model passed to ship).
"$PYTHON" benchmarks/compare_validation.py --data "$DATA" --masks "$MASKS" weights "$OUT" || true
cp "$OUT/model.safetensors" "$OUT/model.json" weights/
# OOD statistics with the current detector, the evaluation recorded in model.json, the cards.
"$PYTHON" -m tumor_xai.ood --data "$DATA" --weights weights
"$PYTHON" -m tumor_xai.evaluate --data "$DATA" --out reports/eval --record --localization --masks "$MASKS" \
  --methods gradcam,gradcam++,layercam --layers layer4,layer3
"$PYTHON" -m tumor_xai.card
