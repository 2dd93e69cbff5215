#!/usr/bin/env bash
# Every GPU figure the README cites, reproduced on the device machine.
#
# THE RULE FOR ANY GPU WINDOW (15 minutes of device time in all, 10 a command, nothing kept):
#   1. `bash bench/gpu.sh draw-needed` here. Unless bench/results/ already holds a draw of the
#      current configs/pipelines/cifar10.yaml, the first device call is
#        run(command="bash bench/gpu.sh draw", carry=[".gpu"], timeout_s=600)
#      (at most 9.5 minutes on a bare machine: setup, the CIFAR-10 pipeline with budget_min=7,
#      what came back packed under $OUT even if time ran out).
#   2. Then, if the window has about 12 minutes left (a fresh machine's start included),
#        run(command="bash bench/gpu.sh draw-speed", carry=[".gpu"], timeout_s=600)
#      (the throughput comparison, steps cut to fit 9.5 minutes). Then give_back.
#   3. Here: copy what came back into bench/results/ and commit it; `python
#      bench/pipeline_report.py bench/results/cifar10-artifacts.zip --out bench/results/cifar10`
#      (CPU latency and sizes measured here) and `bash bench/gpu.sh report`; update the README
#      tables from them in the same commit.
# Before the window, here: `bash bench/gpu.sh prepare` (wheels and the CIFAR-10 zip into .gpu),
# and `bash bench/device_env_cpu.sh draw` rehearses `draw` with the device's software on the CPU.
#
#   bash bench/gpu.sh prepare     HERE (no GPU): .gpu/whl (lightly, omegaconf, antlr4, submitit,
#                                 torch-pruning, torchao, kornia wheels for Python 3.12) and
#                                 .gpu/cifar10-train.zip (../shared/data/cifar10/train), under the
#                                 64 MiB a device call may carry
#   bash bench/gpu.sh draw-needed HERE: says whether bench/results/ holds a draw of this pipeline
#   bash bench/gpu.sh STEP        ON THE GPU MACHINE: device `run`, carry [".gpu"], command
#                                 `bash bench/gpu.sh STEP`; copy what comes back into bench/results/
#   bash bench/gpu.sh report      anywhere: the README tables from bench/results/*.json
#
# The two one-call steps (each runs `setup` first):
#   draw            configs/pipelines/cifar10.yaml with budget_min=$DRAW_BUDGET (7) on the 45k/5k
#                   split: BYOL ResNet-50 -> probe -> ResNet-18 -> pruned -> int8. $OUT gets draw.log
#                   (every stage's messages), draw.json (what ran, on what, how long), draw-results.md
#                   (launch collect's table), cifar10-artifacts.zip (every artifact's metrics.json,
#                   config, plan, zeroed weights and the real int8 package: bench/pack_artifacts.py),
#                   and the two compressed models with their weights: pruned-model.pt, model_int8.pt2.
#                   At $DRAW_DEADLINE s (555) after the call began, whatever still runs is stopped
#                   (it checkpoints) and what finished is packed, so a call cut short brings back
#                   every finished stage.
#   draw-speed      img/s of BYOL (a lightly-style, b this project, c synthetic; b eager and compiled),
#                   ResNet-18 then ResNet-50, then the 224 px ImageFolder path, each cut to the time
#                   left before $SPEED_DEADLINE s (555): throughput-*.json, eager-*.json, imagefolder224.json,
#                   and draw-speed.log (everything printed, as it is printed)
# The older one-per-command steps (a window of 30 minutes; kept for a longer lease):
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
#   c10-smoke       configs/pipelines/cifar10.yaml end to end on synthetic 32px data, 1 epoch per stage
#   c10             the same pipeline without a budget (its train.epochs), detached, followed across calls
# A step whose JSON is already in bench/results/ is skipped (FORCE=1 runs it again).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
RESULTS=${RESULTS:-$REPO/bench/results}
OUT=${OUT:-$REPO/bench/results}
SITE=${SITE:-/tmp/site}
DATA_ROOT=/tmp/data
LEARN_DIR=/tmp/byol-learn
EPOCHS=${EPOCHS:-50}
DRAW_ROOT=${DRAW_ROOT:-/tmp/draw}
# 7.0 minutes for the pipeline: its CPU rehearsal (bench/device_env_cpu.sh draw, budget 9) took 7%
# more than its budget before budgets timed a full-size checkpoint, 1% after (545 s, setup
# included); 7% on top of 7 minutes and a bare machine's setup (~45 s) still ends near 8.3 minutes,
# inside the deadline, which leaves packing 45 s of the 10-minute call. Raise it once a draw is
# measured.
DRAW_BUDGET=${DRAW_BUDGET:-7.0}        # minutes for the pipeline
DRAW_DEADLINE=${DRAW_DEADLINE:-555}    # seconds after the call began: stop and pack what finished
SPEED_DEADLINE=${SPEED_DEADLINE:-555}
DEVICE=${DEVICE:-cuda}                 # cpu: the rehearsal (bench/device_env_cpu.sh draw)
read -r -a DRAW_ARGS <<< "${DRAW_ARGS:-}"  # more overrides for the pipeline (the rehearsal's data)
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
  [ "$DEVICE" = cpu ] || python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' \
    || { echo "gpu.sh: no CUDA device here; steps other than prepare/report run on the GPU machine"; exit 2; }
  if [ ! -d $SITE/lightly ]; then
    ls .gpu/whl/*.whl >/dev/null 2>&1 || { echo "gpu.sh: no .gpu/whl: run 'bash bench/gpu.sh prepare' here and carry .gpu"; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu/whl/*.whl
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  if [ -z "${DATA_OVERRIDE:-}" ] && [ -z "$(find $DATA_ROOT -maxdepth 3 -type d -name airplane 2>/dev/null | head -1)" ]; then
    [ -f .gpu/cifar10-train.zip ] || { echo "gpu.sh: no .gpu/cifar10-train.zip: run 'bash bench/gpu.sh prepare'"; exit 2; }
    mkdir -p $DATA_ROOT/cifar10
    python3 -m zipfile -e .gpu/cifar10-train.zip $DATA_ROOT/cifar10
  fi
  DATA=${DATA_OVERRIDE:-$(dirname "$(find $DATA_ROOT -maxdepth 3 -type d -name airplane | head -1)")}
  echo "gpu.sh: data $DATA ($(find -L "$DATA" -type f -name "*.jpg" | wc -l) images); $(python3 -c 'import torch, lightly; print("torch", torch.__version__, "lightly", lightly.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")')"
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

pipeline_sha() { sha256sum configs/pipelines/cifar10.yaml | cut -c1-16; }

draw_needed() {  # here: is there a draw of the current pipeline in bench/results?
  if [ -f "$RESULTS/draw.json" ] && grep -q "\"pipeline_sha\": \"$(pipeline_sha)\"" "$RESULTS/draw.json"; then
    echo "gpu.sh: bench/results/draw.json is a draw of this pipeline ($(pipeline_sha)): run draw-speed first"
  else
    echo "gpu.sh: no draw of this pipeline ($(pipeline_sha)) in bench/results: run draw first"
  fi
}

draw_pack() {  # whatever finished under $DRAW_ROOT -> $OUT (at most 8 files, 16 MiB each)
  local finished
  finished=$(find $DRAW_ROOT -maxdepth 3 -name metrics.json | sed "s#$DRAW_ROOT/##; s#/metrics.json##" | sort | tr '\n' ' ')
  echo "gpu.sh: packing the finished stages: ${finished:-none}"
  python3 bench/pack_artifacts.py --allow-empty $DRAW_ROOT "$OUT/cifar10-artifacts.zip" || true
  [ -f $DRAW_ROOT/prune/cifar10/model.pt ] && cp $DRAW_ROOT/prune/cifar10/model.pt "$OUT/pruned-model.pt"
  [ -f $DRAW_ROOT/quant/cifar10/model_int8.pt2 ] && cp $DRAW_ROOT/quant/cifar10/model_int8.pt2 "$OUT/model_int8.pt2"
  python3 -m launch collect $DRAW_ROOT --out /tmp/draw-collect >/dev/null 2>&1 \
    && cp /tmp/draw-collect/results.md "$OUT/draw-results.md" || true
  python3 - "$OUT/draw.json" "$(pipeline_sha)" "$DRAW_BUDGET" "$SECONDS" "$finished" <<'PY'
import json, sys, platform, torch
out, sha, budget, seconds, finished = sys.argv[1:6]
json.dump({"pipeline_sha": sha, "budget_min": float(budget), "call_seconds": int(seconds),
           "finished": finished.split(), "torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
          open(out, "w"), indent=2)
PY
  ls -la "$OUT"
}

draw() {  # the CIFAR-10 pipeline in budget_min=$DRAW_BUDGET; stopped at $DRAW_DEADLINE s, packed either way
  rm -rf $DRAW_ROOT && mkdir -p $DRAW_ROOT
  echo "gpu.sh: draw: pipeline $(pipeline_sha), budget $DRAW_BUDGET min, $SECONDS s spent on setup"
  setsid -w python3 -m launch pipeline configs/pipelines/cifar10.yaml budget_min="$DRAW_BUDGET" run_root=$DRAW_ROOT \
    data.name=imagefolder data.root="$DATA" data.cache_dir=$DRAW_ROOT/cache track.mode=disabled \
    engine.progress=false "${DRAW_ARGS[@]}" > "$OUT/draw.log" 2>&1 < /dev/null &
  local pid=$! rc=0
  while kill -0 $pid 2>/dev/null && [ $SECONDS -lt "$DRAW_DEADLINE" ]; do sleep 2; done
  if kill -0 $pid 2>/dev/null; then  # out of time: every process of the pipeline checkpoints and stops
    echo "gpu.sh: draw reached ${DRAW_DEADLINE} s: stopping the pipeline (SIGTERM), packing what finished"
    kill -TERM -- -$pid 2>/dev/null || true
    for _ in $(seq 20); do kill -0 $pid 2>/dev/null || break; sleep 1; done
    kill -KILL -- -$pid 2>/dev/null || true
    rc=124
  fi
  local status=0
  wait $pid 2>/dev/null || status=$?
  [ $rc -eq 0 ] && rc=$status
  tail -25 "$OUT/draw.log"
  draw_pack
  [ -f $DRAW_ROOT/quant/cifar10/metrics.json ] && echo "gpu.sh: draw done in $SECONDS s" && return 0
  echo "gpu.sh: draw ended before the int8 stage finished (exit $rc); what finished is in \$OUT"
  return 1
}

bounded() {  # bounded SECONDS CMD...: run CMD for at most SECONDS, and never past $SPEED_DEADLINE
  local s=$1; shift
  local left=$(( SPEED_DEADLINE - SECONDS - 5 ))
  [ $left -lt $s ] && s=$left
  [ "$s" -lt 20 ] && { echo "gpu.sh: no time left for: $*"; return 0; }
  timeout --signal=TERM "$s" "$@" || echo "gpu.sh: stopped or failed (exit $?): $*"
}

draw_speed() {  # the throughput comparison, cut to one call; each result is kept as it lands
  local b=(python3 bench/byol_throughput.py --device "$DEVICE" --workers "$(nproc)" --data "$DATA")
  local more; read -r -a more <<< "${SPEED_ARGS:-}"  # the rehearsal's smaller sizes (last wins)
  bounded 150 "${b[@]}" --archs resnet18 --batch-size 512 --steps 50 --warmup 10 --out "$OUT/throughput-resnet18.json" "${more[@]}"
  bounded 120 "${b[@]}" --archs resnet50 --pipelines b --compile never --batch-size 512 --steps 30 --warmup 5 \
    --out "$OUT/eager-resnet50.json" "${more[@]}"
  bounded 240 "${b[@]}" --archs resnet50 --batch-size 512 --steps 30 --warmup 5 --out "$OUT/throughput-resnet50.json" "${more[@]}"
  bounded 60 python3 bench/make_imagenet_shaped.py "$DATA" /tmp/imagenet-shaped --size 256 --per-class "${PER_CLASS_224:-300}"
  bounded 150 "${b[@]}" --imagefolder-224 /tmp/imagenet-shaped --archs resnet50 --pipelines a,b,c \
    --batch-size-224 256 --steps 15 --warmup 5 --out "$OUT/imagefolder224.json" "${more[@]}"
  ls -la "$OUT"
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
    draw) setup; draw ;;
    draw-speed) mkdir -p "$OUT"; { setup; draw_speed; } 2>&1 | tee "$OUT/draw-speed.log" ;;
    draw-needed) draw_needed ;;
    -h|--help|help|list) usage 0 ;;
    *) echo "gpu.sh: unknown step '$step'"; usage 1 ;;
  esac
done
