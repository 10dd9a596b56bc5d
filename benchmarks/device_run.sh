#!/usr/bin/env bash
# The whole GPU part of the model work in ONE call: the collection-shortcut ablation
# (benchmarks/collections_ablation.py: every variant a time-budgeted run of the shipped recipe, all of
# them side by side on the GPU), scored on validation and on the external development sets, and the
# best-ranked runs' weights packed into $OUT (at most 8 files of at most 15 MiB each).
#
# On this machine, before the call (the working tree that travels is limited to 64 MiB):
#     bash benchmarks/device_run.sh --prepare    # data + external sets + wheels into .data/ and .whl/, weights/ aside
#     # device run: command "bash benchmarks/device_run.sh", carry [".data", ".whl"], timeout_s 570
#     bash benchmarks/device_run.sh --restore    # puts weights/ back
#     bash benchmarks/device_run.sh --unpack DIR [DEST]  # the returned files -> DEST (default runs/device-ship)
#
# The Testing split does not travel (size): the chosen run is evaluated on it here, after the call.
# Every setting can be overridden from the environment; the CPU rehearsal (tests/test_device_run.py)
# runs the same script with DEVICE=cpu, a tiny dataset and a few seconds of budget.
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."

DATA=${DATA:-.data/brain-tumor-mri}
MASKS=${MASKS:-.data/brain-tumor-mri-masks}
EXTERNAL=${EXTERNAL:-.data/br35h-tumour-dev,.data/tcia-slices}
RUNS=${RUNS:-runs/device}
VARIANTS=${VARIANTS:-ship,paste70+twins,paste+twins,paste,paste30+collections,paste+collections,paste+strong}
BUDGET=${BUDGET:-300s}
PARALLEL=${PARALLEL:-8}
THREADS=${THREADS:-2}
PART_SIZE=${PART_SIZE:-15M}  # the device returns files of at most 16 MiB
DEVICE=${DEVICE:-cuda}
PYTHON=${PYTHON:-python3}
TRAIN_ARGS=${TRAIN_ARGS:-}   # extra training arguments for every run (the rehearsal's tiny model and size)
ASIDE=${ASIDE:-/tmp/tumor-xai-weights-aside}

case "${1:-}" in
  --prepare)
    mkdir -p .data
    rm -rf .data/brain-tumor-mri && mkdir -p .data/brain-tumor-mri
    cp -r ../shared/data/brain-tumor-mri/Training .data/brain-tumor-mri/
    cp -r ../shared/data/brain-tumor-mri-masks ../shared/data/br35h-tumour-dev .data/
    "$PYTHON" benchmarks/export_volume_slices.py ../shared/data/tcia-volumes-dev .data/tcia-slices
    rm -rf .whl && "$PYTHON" -m pip wheel -q --no-deps -w .whl grad-cam==1.5.7 ttach==0.0.3 pydicom==3.0.2
    rm -rf "$ASIDE" && mkdir -p "$ASIDE" && mv weights/model.safetensors "$ASIDE/"
    du -sh --apparent-size --exclude=.git --exclude=.venv --exclude=.venv-ci --exclude=runs .
    exit 0 ;;
  --restore)
    mv "$ASIDE/model.safetensors" weights/
    exit 0 ;;
  --unpack)
    # DEST/<variant>/ for each returned run (weights + its json files), DEST/summary.{md,json}.
    src=$(cd "$here" && cd "${2:?usage: --unpack DIR [DEST]}" && pwd)
    dest=${3:-runs/device-ship}
    case "$dest" in /*) ;; *) [ -n "${3:-}" ] && dest="$here/$dest" ;; esac
    mkdir -p "$dest/all"
    tar -xzf "$src/runs.tar.gz" -C "$dest/all"
    cp "$src/summary.json" "$dest/"
    cp "$dest/all/summary.md" "$dest/" 2>/dev/null || true
    i=0
    for run in $("$PYTHON" -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))['ranking']]" "$src/summary.json"); do
      [ -f "$src/model$i.safetensors.part-00" ] || break
      name=$(basename "$run")
      mkdir -p "$dest/$name"
      cp "$dest/all/$name"/{model.json,config.json,log.json} "$dest/$name/"
      cat "$src/model$i.safetensors.part-"* > "$dest/$name/model.safetensors"
      echo "unpacked rank $i: $dest/$name"
      i=$((i + 1))
    done
    exit 0 ;;
  "") ;;
  *) echo "usage: $0 [--prepare | --restore | --unpack DIR [DEST]]" >&2; exit 2 ;;
esac

: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONUNBUFFERED=1
started=$(date +%s)

# Packages the device image lacks travel as wheels (.whl, made by --prepare).
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

# Fail in seconds, not minutes, when the data did not travel or a package is missing.
for d in "$DATA" "$MASKS" ${EXTERNAL//,/ }; do
  [ -d "$d" ] || { echo "error: $d not found (run --prepare here and carry .data)" >&2; exit 3; }
done
"$PYTHON" -c "import pytorch_grad_cam, pydicom, tumor_xai.train, tumor_xai.evaluate, tumor_xai.external"
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
fi

external=()
for d in ${EXTERNAL//,/ }; do external+=(--external "$d"); done
train_args=()
for a in $TRAIN_ARGS; do train_args+=("--train-arg=$a"); done
mkdir -p "$RUNS"
set +e
"$PYTHON" benchmarks/collections_ablation.py --data "$DATA" --masks "$MASKS" --out "$RUNS" "${external[@]}" \
  --variants "$VARIANTS" --budget "$BUDGET" --parallel "$PARALLEL" --device "$DEVICE" --threads "$THREADS" \
  "${train_args[@]}" 2>&1 | tee "$RUNS/ablation.log"
status=${PIPESTATUS[0]}
set -e

# Whatever finished comes back, also after a failure: the summary, every run's logs, the chosen weights.
cp "$RUNS/summary.json" "$OUT/" 2>/dev/null || true
(cd "$RUNS" && find . \( -name log.json -o -name config.json -o -name model.json -o -name '*.log' -o -name summary.md \) \
  -print0 | tar -czf "$OUT/runs.tar.gz" --null -T -) || true
# The first SHIP_TOP runs of the ranking come back (each ResNet18 in two parts): the chosen one is gated
# here, on Testing too, and the next ones stand by if it fails.
SHIP_TOP=${SHIP_TOP:-3}
mapfile -t ranked < <("$PYTHON" -c "import json,sys; [print(r) for r in json.load(open(sys.argv[1]))['ranking'][:int(sys.argv[2])]]" "$RUNS/summary.json" "$SHIP_TOP" 2>/dev/null || true)
if [ "${#ranked[@]}" -gt 0 ]; then
  for i in "${!ranked[@]}"; do
    split -b "$PART_SIZE" -d "${ranked[$i]}/model.safetensors" "$OUT/model$i.safetensors.part-"
    echo "rank $i: ${ranked[$i]}"
  done
else
  echo "no run to ship (see ablation.log)" >&2
  [ "$status" -eq 0 ] && status=4
fi
ls -l "$OUT"
echo "device_run: $(( $(date +%s) - started )) s, exit $status"
exit "$status"
