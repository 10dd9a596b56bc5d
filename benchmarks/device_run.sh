#!/usr/bin/env bash
# The whole GPU part of the model work in ONE call: train the recipe variants over several seeds,
# evaluate each, train more seeds of the variant that validation prefers, and pack the summary and
# the median seed's weights into $OUT (at most 8 files of at most 15 MiB each).
#
# On this machine, before the call (the working tree that travels is limited to 64 MiB):
#     bash benchmarks/device_run.sh --prepare    # copies the data into .data/ (git-ignored), moves weights/ aside
#     # device run: command "bash benchmarks/device_run.sh", carry [".data"], timeout_s 560
#     bash benchmarks/device_run.sh --restore    # puts weights/ back
#     bash benchmarks/device_run.sh --unpack DIR [DEST]  # the returned files -> DEST (default runs/device-ship)
#
# Every setting can be overridden from the environment; the CPU rehearsal (tests/test_device_run.py)
# runs the same script with DEVICE=cpu, 1 epoch, 64 px and a handful of images.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."

DATA=${DATA:-.data/brain-tumor-mri}
MASKS=${MASKS:-.data/brain-tumor-mri-masks}
RUNS=${RUNS:-runs/device}
VARIANTS=${VARIANTS:-baseline,strong,cam,cam+strong}
SEEDS=${SEEDS:-0,1}
EXTRA_SEEDS=${EXTRA_SEEDS:-2}
EPOCHS=${EPOCHS:-100}
IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH_SIZE=${BATCH_SIZE:-128}
ARCH=${ARCH:-resnet18}
SPLIT_SEED=${SPLIT_SEED:-0}  # every run keeps out the shipped weights' carve-out: compared, and gated, on one set
PART_SIZE=${PART_SIZE:-15M}  # the device returns files of at most 16 MiB
DEVICE=${DEVICE:-cuda}
BUDGET_MIN=${BUDGET_MIN:-7}
EVAL_WORKERS=${EVAL_WORKERS:-8}
PYTHON=${PYTHON:-python3}
ASIDE=${ASIDE:-/tmp/tumor-xai-weights-aside}

case "${1:-}" in
  --prepare)
    mkdir -p .data
    cp -r ../shared/data/brain-tumor-mri ../shared/data/brain-tumor-mri-masks .data/
    rm -rf "$ASIDE" && mkdir -p "$ASIDE" && mv weights/model.safetensors "$ASIDE/"
    du -sh --apparent-size --exclude=.git --exclude=.venv --exclude=.venv-ci .
    exit 0 ;;
  --restore)
    mv "$ASIDE/model.safetensors" weights/
    exit 0 ;;
  --unpack)
    src=$(cd "$here" && cd "${2:?usage: --unpack DIR [DEST]}" && pwd)
    dest=${3:-runs/device-ship}
    case "$dest" in /*) ;; *) [ -n "${3:-}" ] && dest="$here/$dest" ;; esac
    mkdir -p "$dest"
    tar -xzf "$src/ship.tar.gz" -C "$dest"
    cat "$src"/model.safetensors.part-* > "$dest/model.safetensors"
    cp "$src/summary.md" "$src/summary.json" "$dest/"
    echo "unpacked the median seed of the chosen variant into $dest (load with Predictor.from_pretrained)"
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--prepare | --restore | --unpack DIR [DEST]]" >&2; exit 2 ;;
esac

: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONUNBUFFERED=1
started=$(date +%s)

# Fail in seconds, not minutes, when the data did not travel (ablation.py imports training and evaluation
# before it trains anything, so a missing package fails fast too).
for d in "$DATA" "$MASKS"; do
  [ -d "$d" ] || { echo "error: $d not found (run --prepare here and carry .data)" >&2; exit 3; }
done
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

eval_device=cpu
[ "$DEVICE" = cuda ] && eval_device=cuda
set +e
"$PYTHON" benchmarks/ablation.py --data "$DATA" --masks "$MASKS" --out "$RUNS" \
  --variants "$VARIANTS" --seeds "$SEEDS" --extra-seeds "$EXTRA_SEEDS" --epochs "$EPOCHS" \
  --image-size "$IMAGE_SIZE" --batch-size "$BATCH_SIZE" --device "$DEVICE" --budget-min "$BUDGET_MIN" \
  --eval-workers "$EVAL_WORKERS" --eval-device "$eval_device" --train-arg=--half --train-arg=--arch="$ARCH" \
  --train-arg=--split-seed="$SPLIT_SEED" 2>&1 | tee "$OUT/ablation.log"
status=${PIPESTATUS[0]}
set -e

# Whatever finished comes back, also after a failure: the summary, every run's logs, the chosen weights.
cp "$RUNS/summary.md" "$RUNS/summary.json" "$OUT/" 2>/dev/null || true
(cd "$RUNS" && find . \( -name log.json -o -name validation.json -o -name metrics.json -o -name config.json \
  -o -name eval.log \) -print0 | tar -czf "$OUT/runs.tar.gz" --null -T -) || true
ship=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1])).get('ship') or '')" "$RUNS/summary.json" 2>/dev/null || true)
if [ -n "$ship" ] && [ -f "$ship/model.safetensors" ]; then
  tar -czf "$OUT/ship.tar.gz" -C "$ship" model.json config.json log.json validation.json \
    $(cd "$ship" && ls eval/metrics.json eval/report.md 2>/dev/null)
  split -b "$PART_SIZE" -d "$ship/model.safetensors" "$OUT/model.safetensors.part-"
  echo "ship: $ship"
else
  echo "no run to ship (see ablation.log)" >&2
  [ "$status" -eq 0 ] && status=4
fi
ls -l "$OUT"
echo "device_run: $(( $(date +%s) - started )) s, exit $status"
exit "$status"
