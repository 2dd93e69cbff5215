#!/usr/bin/env bash
# The measurement behind prune.round_to=32 and configs/pipelines/cifar10.yaml's 40% MACs target,
# on the 2-core CPU: that file's architectures end to end on synthetic images, one epoch a stage
# (sizes and timings are the point here, not accuracies), then its distilled student pruned again
# at round_to 16 / 32 and to 50 / 45% of the MACs, each quantised and packaged by the quant stage,
# and every int8 package timed at batch 1 and 32 against the fp32 teacher in interleaved rounds.
#   bash bench/prune_widths_cpu.sh                 # ~15 min here; RUNS=/tmp/pw by default
#   python bench/pipeline_report.py $RUNS --out DIR   # the table and targets of the pipeline's own run
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/pw}
C=(data.name=synthetic data.synthetic_size=320 train.batch_size=64 train.epochs=1 track.mode=disabled
   eval.probe_epochs=5 engine.progress=false run_root="$RUNS")
if [ ! -f "$RUNS/quant/cifar10/metrics.json" ]; then  # the pipeline's own: 40% of the MACs, round_to 32
  python -m launch pipeline configs/pipelines/cifar10.yaml "${C[@]}"
fi
for v in "r16-m50:prune.round_to=16 prune.target_macs_ratio=0.5" "r32-m50:prune.round_to=32 prune.target_macs_ratio=0.5" \
         "r32-m45:prune.round_to=32 prune.target_macs_ratio=0.45"; do
  name=${v%%:*}
  read -r -a extra <<< "${v#*:}"
  [ -f "$RUNS/prune/$name/metrics.json" ] || python -m prune configs/pipelines/cifar10.yaml "${C[@]}" name="$name" \
    student="$RUNS/distill/cifar10" teacher="$RUNS/byol/cifar10" teacher_head="$RUNS/probe/cifar10" "${extra[@]}"
  [ -f "$RUNS/quant/$name/metrics.json" ] || python -m quant configs/pipelines/cifar10.yaml "${C[@]}" name="$name" \
    source="$RUNS/prune/$name" teacher="$RUNS/byol/cifar10" teacher_head="$RUNS/probe/cifar10" latency.enabled=false
done
for d in "$RUNS"/prune/*; do  # the widths each variant kept
  python - "$d" <<'EOF'
import sys, torch
from core import checkpoint as ckpt
art = ckpt.load_model(sys.argv[1])
print(sys.argv[1], "conv widths:", [m.out_channels for m in art.backbone.modules() if isinstance(m, torch.nn.Conv2d)])
EOF
done
python bench/latency_artifacts.py "$RUNS/byol/cifar10" "$RUNS/quant/cifar10" "$RUNS"/quant/r*-m* \
  --rounds 3 --iters 50 --warmup 10
