#!/usr/bin/env bash
# Every GPU figure the README cites, reproduced on the device machine, one step per command;
# each step fits in one 10-minute command. Results go under $OUT (the device's output folder).
#
#   bash bench/gpu.sh prepare     HERE (no GPU): .gpu/whl (lightly, omegaconf, antlr4, submitit,
#                                 torch-pruning, torchao, kornia wheels for Python 3.12) and
#                                 .gpu/cifar10-train.zip (../shared/data/cifar10/train): 66 MB with
#                                 the tracked files, under the 64 MiB (67.1 MB) a device call may carry
#   bash bench/device_env_cpu.sh quant-tests quickstart c10 bench
#                                 HERE, optional: the same software (torch 2.11, these wheels) on the CPU
#   bash bench/gpu.sh STEP        ON THE GPU MACHINE: device `run`, carry [".gpu"], command
#                                 `bash bench/gpu.sh STEP`; copy what comes back into bench/results/
#   bash bench/gpu.sh report      anywhere: the README tables from bench/results/*.json
#
# Steps on the GPU machine, in this order (each runs `setup` first; setup is idempotent):
#   setup           wheels into /tmp/site (PYTHONPATH), CIFAR-10 JPEGs into /tmp/data
#   tests-gpu       the CUDA-only tests of core.augment and core.optim (no host syncs, GPU = CPU)
#   throughput-r18  a / a_bf16 / b / c and ratios, ResNet-18, batch 512  -> throughput-resnet18.json
#   throughput-r50  the same for ResNet-50                               -> throughput-resnet50.json
#   augment         the two-view augmentation alone: core.augment eager / compiled against
#                   kornia.augmentation, 32 px (batch 512) and 224 px (batch 256)  -> augment.json
#   imagefolder224  CIFAR upscaled to 256 px (1,300 per class), a / b / c at 224 px, ResNet-50,
#                   batch 256, JPEG bytes decoded on the GPU                   -> imagefolder224.json
#   learn-b         ResNet-18, 50 epochs, the project's pipeline, kNN top-1 on the carved val split
#   learn-a         the same with the lightly-style pipeline (about 6 min at ~7k img/s)
#                   -> learn-b.json, learn-a.json; `report` puts both in one table
#   c10-smoke       configs/pipelines/cifar10.yaml end to end on synthetic 32px data, 1 epoch per
#                   stage (~4 min): CUDA-path errors show here, not 20 minutes into the real run,
#                   and its compiled kernels stay in the inductor cache for it   -> c10-smoke.log
#   c10             the CIFAR-10 pipeline itself (~22 min, issue 7), detached from the call
#                   (setsid): each call waits up to 9.5 min, then says "call again"; call it again
#                   at once until it says done. Then -> c10.log, cifar10-artifacts.zip (every
#                   artifact, weights zeroed: bench/pack_artifacts.py), c10-results.md; a call that
#                   ends before the pipeline does brings back the stages finished so far
#   Here, afterwards: python bench/pipeline_report.py bench/results/cifar10-artifacts.zip --out
#                   bench/results/cifar10 measures the CPU rows on this machine; README table.
#   Issue 7 needs a session of its own: setup + c10-smoke + c10 is about 27 of its 30 minutes.
# A step whose JSON is already in bench/results/ is skipped (FORCE=1 runs it again). learn-a/-b
# checkpoint every epoch under /tmp/byol-learn and stop themselves before the 10-minute limit
# (timeout 560 s): if a step ends with "rerun to continue", call it again at once, while the
# machine is still warm (it keeps /tmp for 30 s after a call; a fresh machine starts over).
#
# Device time: about 25 minutes for the steps before c10 (the session budget is 30): as few calls
# as the 10-minute limit allows, e.g. `bash bench/gpu.sh throughput-r18 && bash bench/gpu.sh
# throughput-r50` in one call is about 8 minutes. Several steps may be named in one command.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
RESULTS=${RESULTS:-$REPO/bench/results}
OUT=${OUT:-$REPO/bench/results}
SITE=/tmp/site
DATA_ROOT=/tmp/data
LEARN_DIR=/tmp/byol-learn
EPOCHS=${EPOCHS:-50}
export PYTHONUNBUFFERED=1 WANDB_SILENT=true

usage() { awk 'NR > 1 && /^set /{exit} NR > 1' "$0"; exit "${1:-0}"; }  # the header above

prepare() {  # here, with network: what the GPU machine cannot fetch
  mkdir -p .gpu/whl
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # The stages need submitit, torch-pruning and torchao too (c10-smoke, c10); kornia only `augment`.
  for p in lightly==1.6.0 omegaconf==2.3.0 submitit==1.5.4 torch-pruning==1.6.1 torchao==0.18.0 \
           kornia==0.9.0 kornia-rs==0.2.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${plat[@]}" -d .gpu/whl "$p"
  done
  # omegaconf needs antlr4-python3-runtime 4.9.*, published only as source: build its wheel here.
  python3 -m pip wheel -q --no-deps -w .gpu/whl "antlr4-python3-runtime==4.9.3"
  if [ ! -f .gpu/cifar10-train.zip ]; then
    (cd "$REPO/../shared/data/cifar10" && zip -q -r -0 "$REPO/.gpu/cifar10-train.zip" train)
  fi
  ls -la .gpu/whl .gpu/cifar10-train.zip
  # What a device call carries: the tracked files and .gpu, 64 MiB at most.
  local total=$(( $(du -sb .gpu | cut -f1) + $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) ))
  echo "gpu.sh: a call carries $(( total / 1048576 )) MiB of its 64 (kornia's wheels, 7 MB, serve only 'augment')"
  [ $total -le 67108864 ] || { echo "gpu.sh: over the device's 64 MiB: remove .gpu/whl/kornia* unless running augment"; exit 2; }
}

setup() {  # on the GPU machine; idempotent
  python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    || { echo "gpu.sh: no CUDA device here; steps other than prepare/report run on the GPU machine"; exit 2; }
  if [ ! -d $SITE/lightly ]; then
    ls .gpu/whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: no .gpu/whl: run 'bash bench/gpu.sh prepare' here and carry .gpu"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu/whl/*.whl
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  if [ -z "$(find $DATA_ROOT -maxdepth 3 -type d -name airplane 2>/dev/null | head -1)" ]; then
    [ -f .gpu/cifar10-train.zip ] || { echo "gpu.sh: no .gpu/cifar10-train.zip: run 'bash bench/gpu.sh prepare'"; exit 2; }
    mkdir -p $DATA_ROOT/cifar10
    python3 -m zipfile -e .gpu/cifar10-train.zip $DATA_ROOT/cifar10
  fi
  DATA=$(dirname "$(find $DATA_ROOT -maxdepth 3 -type d -name airplane | head -1)")
  echo "gpu.sh: data $DATA ($(find "$DATA" -type f | wc -l) images); $(python3 -c 'import torch, lightly; print("torch", torch.__version__, "lightly", lightly.__version__, torch.cuda.get_device_name())')"
  mkdir -p "$OUT"
}

done_already() {  # done_already NAME: the result is in bench/results (and FORCE is unset)
  if [ -z "${FORCE:-}" ] && [ -f "$RESULTS/$1.json" ]; then
    echo "gpu.sh: $RESULTS/$1.json exists; skipping (FORCE=1 reruns)"
    return 0
  fi
  return 1
}

bench() { python3 bench/byol_throughput.py --device cuda --workers "$(nproc)" "$@"; }

throughput() {  # throughput ARCH
  done_already "throughput-$1" && return 0
  bench --archs "$1" --data "$DATA" --batch-size 512 --steps 100 --warmup 20 \
    --out "$OUT/throughput-$1.json" 2>&1 | tee "$OUT/throughput-$1.log"
}

imagefolder224() {
  done_already imagefolder224 && return 0
  python3 bench/make_imagenet_shaped.py "$DATA" /tmp/imagenet-shaped --size 256 --per-class 1300
  bench --imagefolder-224 /tmp/imagenet-shaped --archs resnet50 --pipelines a,b,c --batch-size-224 256 \
    --steps 30 --warmup 10 --out "$OUT/imagefolder224.json" 2>&1 | tee "$OUT/imagefolder224.log"
}

augment() {
  done_already augment && return 0
  # lightly's PIL views (one process) are a CPU figure: README, "The augmentation"
  bench --augment --augments project,project_compiled,kornia --data "$DATA" --batch-size 512 --batch-size-224 256 \
    --steps 20 --warmup 10 --augment-rounds 5 \
    --out "$OUT/augment.json" 2>&1 | tee "$OUT/augment.log"
}

learn() {  # learn a|b
  done_already "learn-$1" && return 0
  local rc=0
  timeout --signal=TERM 560 python3 bench/byol_throughput.py --device cuda --workers "$(nproc)" \
    --data "$DATA" --archs resnet18 --learn-epochs "$EPOCHS" --learn-pipelines "$1" --learn-dir $LEARN_DIR \
    --out "$OUT/learn-$1.json" 2>&1 | tee "$OUT/learn-$1.log" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "gpu.sh: learn-$1 stopped (exit $rc) with its checkpoint in $LEARN_DIR: rerun to continue"
    return "$rc"
  fi
}

C10_ROOT=/tmp/c10
C10_ARGS=(data.name=imagefolder data.cache_dir=/tmp/c10-cache track.mode=disabled engine.progress=false)

c10_smoke() {
  python3 -m launch pipeline configs/pipelines/cifar10.yaml run_root=/tmp/c10-smoke data.name=synthetic \
    data.synthetic_size=2560 train.epochs=1 track.mode=disabled engine.progress=false 2>&1 | tee "$OUT/c10-smoke.log"
}

c10() {  # start (or find) the detached pipeline, follow it for up to 9.5 minutes
  local log=$C10_ROOT.log pidfile=$C10_ROOT.pid waited=0
  if [ -f $C10_ROOT/quant/cifar10/metrics.json ]; then
    echo "gpu.sh: the pipeline is done"
  elif [ -f $pidfile ] && kill -0 "$(cat $pidfile)" 2>/dev/null; then
    echo "gpu.sh: the pipeline is running (pid $(cat $pidfile)); following it"
  else  # first call, or a stopped run: the same command resumes from the checkpoints
    echo "gpu.sh: starting the pipeline: log $log"
    setsid nohup python3 -m launch pipeline configs/pipelines/cifar10.yaml run_root=$C10_ROOT \
      data.root="$DATA" "${C10_ARGS[@]}" >>$log 2>&1 < /dev/null &
    echo $! > $pidfile
  fi
  while kill -0 "$(cat $pidfile)" 2>/dev/null && [ $waited -lt 570 ]; do sleep 10; waited=$((waited + 10)); done
  cp $log "$OUT/c10.log"
  if [ ! -f $C10_ROOT/quant/cifar10/metrics.json ]; then
    # The machine may be gone before the next call: bring back every stage finished so far.
    python3 bench/pack_artifacts.py $C10_ROOT "$OUT/cifar10-artifacts.zip" || true
    if kill -0 "$(cat $pidfile)" 2>/dev/null; then
      tail -3 $log; echo "gpu.sh: c10 still running: call 'bash bench/gpu.sh c10' again at once"
    else
      tail -20 $log; echo "gpu.sh: c10 stopped before the end (log above); calling c10 again resumes it"
    fi
    return 1
  fi
  python3 bench/pack_artifacts.py $C10_ROOT "$OUT/cifar10-artifacts.zip"
  python3 -m launch collect $C10_ROOT --out /tmp/c10-collect --cost latency && cp /tmp/c10-collect/results.md "$OUT/c10-results.md"
  echo "gpu.sh: c10 done; here: python bench/pipeline_report.py bench/results/cifar10-artifacts.zip --out bench/results/cifar10"
}

[ $# -ge 1 ] || usage 1
for step in "$@"; do
  case "$step" in
    prepare) prepare ;;
    report) python3 bench/byol_throughput.py --report "$RESULTS"/*.json ;;
    setup) setup ;;
    tests-gpu) setup; python3 -m pytest -q -m gpu tests/test_optim.py tests/test_augment.py 2>&1 | tee "$OUT/tests-gpu.log" ;;
    throughput-r18) setup; throughput resnet18 ;;
    throughput-r50) setup; throughput resnet50 ;;
    augment) setup; augment ;;
    imagefolder224) setup; imagefolder224 ;;
    learn-a) setup; learn a ;;
    learn-b) setup; learn b ;;
    c10-smoke) setup; c10_smoke ;;
    c10) setup; c10 ;;
    -h|--help|help|list) usage 0 ;;
    *) echo "gpu.sh: unknown step '$step'"; usage 1 ;;
  esac
done
