#!/usr/bin/env bash
# Rehearse a GPU session's software on the CPU, before a GPU is lent: the device image's Python
# 3.12, torch 2.11.0 and torchvision 0.26.0 (/work/.library/device/KINDS.md) in a venv, the wheels
# bench/gpu.sh carries installed the way its `setup` installs them (--no-deps --target), W&B
# absent as there, and the project run from a plain checkout (not pip-installed), as there.
# What breaks here would break 20 minutes into a GPU session. It found two such failures under
# torch 2.11: non-strict export left the x86 quantizer nothing to annotate (quant/pt2e.py), and
# DDP's BN buffer broadcast broke BYOL's backward (byol/train.py: broadcast_buffers=False).
#
#   bash bench/device_env_cpu.sh env           # the venv and site (~2 min; 5 GB, torch's CUDA wheel)
#   bash bench/device_env_cpu.sh quant-tests   # tests/test_quant.py there (~3 min)
#   bash bench/device_env_cpu.sh quickstart    # the quickstart pipeline there (~5 min): the README's numbers
#   bash bench/device_env_cpu.sh c10           # configs/pipelines/cifar10.yaml on synthetic images (~5 min)
#   bash bench/device_env_cpu.sh c10-compiled  # the same with torch.compile and bf16, as on CUDA (~7 min)
#   bash bench/device_env_cpu.sh bench         # every byol_throughput.py mode gpu.sh runs, toy-sized (~2 min)
#   bash bench/device_env_cpu.sh tests         # the whole suite under torch 2.11 (~8 min; W&B and
#                                              # import-linter added for it, in a site of their own)
#   bash bench/device_env_cpu.sh draw          # `bash bench/gpu.sh draw` itself, on the CPU at CPU scale:
#                                              # 40 CIFAR-10 images a class at 16 px, batch 64, budget_min=$DRAW_BUDGET
#                                              # (9); checks $OUT holds every file the GPU call brings back
#   bash bench/device_env_cpu.sh draw-cut      # the same cut off by its deadline ($DRAW_CUT_AT s, 420: in
#                                              # prune) mid-pipeline: what finished must still come back
#   bash bench/device_env_cpu.sh draw-speed    # `bash bench/gpu.sh draw-speed` at toy size
# Several steps may be named in one call; `env` (idempotent) and a fresh checkout come first. Runs go to $WORK.
set -euo pipefail
trap 'echo "device_env_cpu.sh: failed at line $LINENO: $BASH_COMMAND"' ERR
cd "$(dirname "$0")/.."
REPO=$(pwd)
WORK=${WORK:-/tmp/device-env}
VENV=$WORK/venv SITE=$WORK/site
PY=${PY:-python3.12}
export PYTHONUNBUFFERED=1 WANDB_SILENT=true

env_() {
  if [ ! -x $VENV/bin/python ]; then
    $PY -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
      || { echo "device_env_cpu.sh: needs Python 3.12 (PY=..., e.g. PY='env PYENV_VERSION=3.12.1 python3.12')"; exit 2; }
    $PY -m venv $VENV
    # The device image's own packages that the project uses (torch's CUDA build runs on the CPU too).
    $VENV/bin/pip install -q torch==2.11.0 torchvision==0.26.0 numpy scikit-learn matplotlib \
      pyyaml tqdm einops pillow pytorch-lightning requests cloudpickle psutil protobuf pytest
  fi
  if [ ! -d $SITE/lightly ]; then
    [ -d .gpu/whl ] || bash bench/gpu.sh prepare
    $VENV/bin/python -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu/whl/*.whl
  fi
  PYRUN=(env PYTHONPATH=$SITE $VENV/bin/python)
  "${PYRUN[@]}" -c 'import torch, torchvision, lightly, torchao; print("device_env_cpu.sh: torch", torch.__version__,
    "torchvision", torchvision.__version__, "lightly", lightly.__version__, "torchao", torchao.__version__)' 2>&1 | tail -1
}

# A plain copy of the tracked files, as a device call gets (no egg-info, no caches).
checkout() { rm -rf $WORK/repo && mkdir -p $WORK/repo && git ls-files -z | xargs -0 tar c | tar x -C $WORK/repo; }

small_cifar() {  # 40 images a class of ../shared/data/cifar10/train, linked
  [ -f $WORK/c10small/.done ] && return 0
  local src=$REPO/../shared/data/cifar10/train files
  rm -rf $WORK/c10small
  for c in "$src"/*/; do
    c=$(basename "$c"); mkdir -p $WORK/c10small/$c
    mapfile -t files < <(find "$src/$c" -name '*.jpg' | sort)
    ln -s "${files[@]:0:40}" $WORK/c10small/$c/
  done
  touch $WORK/c10small/.done
}

usage() { awk 'NR > 1 && /^set /{exit} NR > 1' "$0"; }  # the header above
STEPS=" env quant-tests tests quickstart c10 c10-compiled bench draw draw-cut draw-speed "

draw_rehearsal() {  # draw_rehearsal BUDGET_MIN DEADLINE_S: gpu.sh draw on the CPU, then check $OUT
  local out=$WORK/$step-out
  rm -rf "$out" && mkdir -p "$out"
  PATH=$VENV/bin:$PATH SITE=$SITE DEVICE=cpu OUT=$out DATA_OVERRIDE=$WORK/c10small DRAW_ROOT=$WORK/$step-root \
    DRAW_BUDGET=$1 DRAW_DEADLINE=$2 DRAW_ARGS="data.image_size=16 train.batch_size=64 eval.probe_epochs=20 eval.knn_k=20" \
    bash bench/gpu.sh draw || true
  echo "device_env_cpu.sh: $step brought back:"; ls -la "$out"
  local missing=()
  for f in draw.log draw.json cifar10-artifacts.zip; do [ -s "$out/$f" ] || missing+=("$f"); done
  if [ "$step" = draw ]; then
    for f in draw-results.md pruned-model.pt model_int8.pt2; do [ -s "$out/$f" ] || missing+=("$f"); done
  fi
  [ $(ls "$out" | wc -l) -le 8 ] || missing+=("(more than the 8 files a device call returns)")
  [ ${#missing[@]} -eq 0 ] || { echo "device_env_cpu.sh: $step: missing ${missing[*]}"; exit 1; }
  "${PYRUN[@]}" -c "import json, sys; d = json.load(open('$out/draw.json')); print('device_env_cpu.sh: $step:', d)"
}
[ $# -ge 1 ] || { usage; exit 1; }
for step in "$@"; do  # a misspelt step stops here, not after the venv is built
  [[ "$STEPS" == *" $step "* ]] || { echo "device_env_cpu.sh: unknown step '$step'"; usage; exit 1; }
done
env_
checkout
cd $WORK/repo
for step in "$@"; do
  case "$step" in
    env) ;;
    quant-tests) "${PYRUN[@]}" -m pytest -q -p no:cacheprovider tests/test_quant.py ;;
    tests)
      [ -d $WORK/site-tests/wandb ] || $VENV/bin/pip install -q --target $WORK/site-tests wandb import-linter
      env PYTHONPATH=$WORK/site-tests:$SITE $VENV/bin/python -m pytest -q -p no:cacheprovider ;;
    quickstart)
      rm -rf $WORK/qs
      "${PYRUN[@]}" -m launch pipeline configs/quickstart.yaml run_root=$WORK/qs track.mode=disabled engine.progress=false ;;
    c10|c10-compiled)  # what gpu.sh c10-smoke runs, at CPU size (the arguments of bench/prune_widths_cpu.sh)
      extra=(); [ "$step" = c10-compiled ] && extra=(engine.compile=always engine.precision=bf16)  # CUDA's defaults
      rm -rf "${WORK:?}/$step"
      "${PYRUN[@]}" -m launch pipeline configs/pipelines/cifar10.yaml run_root=$WORK/$step data.name=synthetic \
        data.synthetic_size=320 train.batch_size=64 train.epochs=1 track.mode=disabled eval.probe_epochs=5 \
        engine.progress=false "${extra[@]}"
      "${PYRUN[@]}" bench/pack_artifacts.py $WORK/$step $WORK/$step-artifacts.zip ;;
    draw) small_cifar; draw_rehearsal "${DRAW_BUDGET:-9}" "${DRAW_DEADLINE:-900}" ;;
    draw-cut) small_cifar; draw_rehearsal "${DRAW_BUDGET:-9}" "${DRAW_CUT_AT:-420}" ;;
    draw-speed)
      small_cifar
      rm -rf "$WORK/speed-out" && mkdir -p "$WORK/speed-out"
      PATH=$VENV/bin:$PATH SITE=$SITE DEVICE=cpu OUT=$WORK/speed-out DATA_OVERRIDE=$WORK/c10small SPEED_DEADLINE=400 \
        PER_CLASS_224=4 SPEED_ARGS="--batch-size 32 --batch-size-224 4 --steps 1 --warmup 1 --workers 2" \
        bash bench/gpu.sh draw-speed
      ls -la "$WORK/speed-out" ;;
    bench)
      small_cifar
      B=("${PYRUN[@]}" bench/byol_throughput.py --device cpu --data $WORK/c10small --cache-dir $WORK/cache)
      "${B[@]}" --archs resnet18 --batch-size 32 --steps 1 --warmup 1 --workers 2 --out $WORK/throughput.json
      "${B[@]}" --augment --batch-size 64 --batch-size-224 8 --steps 2 --warmup 1 --augment-rounds 1 \
        --stats-images 64 --stats-rounds 1 --out $WORK/augment.json
      "${PYRUN[@]}" bench/make_imagenet_shaped.py $WORK/c10small $WORK/in224 --size 256 --per-class 4
      "${PYRUN[@]}" bench/byol_throughput.py --device cpu --imagefolder-224 $WORK/in224 --archs resnet50 \
        --pipelines a,b,c --batch-size-224 4 --steps 1 --warmup 1 --workers 2 --out $WORK/imagefolder224.json
      rm -rf $WORK/learn
      for p in b a; do
        "${B[@]}" --archs resnet18 --batch-size 32 --workers 2 --learn-epochs 1 --learn-pipelines $p \
          --learn-dir $WORK/learn --out $WORK/learn-$p.json
      done
      "${PYRUN[@]}" bench/byol_throughput.py --report $WORK/throughput.json $WORK/augment.json \
        $WORK/imagefolder224.json $WORK/learn-*.json ;;
  esac
done
