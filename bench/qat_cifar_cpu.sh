#!/usr/bin/env bash
# The int8-vs-fp32 gap of the quant stage on CIFAR-10, at a scale 2 CPU cores can train: the
# stand-in for the H100 check of issue #5 until a GPU is lent (README, "int8 QAT on CIFAR-10 at
# CPU scale"). Digits' 359 validation images cannot resolve half a point; CIFAR-10's 5,000 can.
#
#   1. init      an untrained half-width CIFAR ResNet-18 (bench/init_artifact.py): 140M MACs,
#                2.8M params, the shape of the pipeline's pruned student
#   2. source    supervised from scratch with the finetune stage: all 45k labels, 3 epochs
#                (about 8 min an epoch on the 2-core machine); its classifier is the fp32 source
#   3. probe     the fp32 source under the probe protocol (frozen features, linear probe): the
#                fair fp32 figure beside the int8 model's refitted head (quant.refit_head)
#   4. qat       the quant stage on it, with the labels (loss.ce=1, no teacher),
#                1 epoch (BN and observers frozen at conversion), head refitted, exported, and
#                the converted int8 file evaluated on the same 5k validation images
#   5. qat-kd    the same QAT distilling from the fp32 source's logits (loss.kd=1, the stage's
#                default loss) instead of the labels
#   6. ptq       post-training quantisation of the same source (quant.mode=ptq): 8 batches of 256
#                training images calibrate, nothing trains; the baseline QAT is read against
#   7. peers     bench/int8_peers.py on qat's and ptq's runs: fp32, the project's int8 files and
#                ONNX Runtime (fp32, the project's QDQ models, its own quantize_static), side by side
#
#   bash bench/qat_cifar_cpu.sh [init] [source] [probe] [qat] [qat-kd] [ptq] [peers] [QUANT OVERRIDES...]
#   (default: init source probe qat qat-kd)
#   RUNS=/tmp/qc/runs DATA=../shared/data/cifar10/train bash bench/qat_cifar_cpu.sh qat name=lr0 train.lr=0
#
# Every step skips work that is finished; source and the QAT steps resume from their checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-/tmp/qc/runs}
DATA=${DATA:-../shared/data/cifar10/train}
CACHE=${CACHE:-/tmp/qc/cache}
export WANDB_SILENT=true
data=(data.name=imagefolder "data.root=$DATA" "data.cache_dir=$CACHE" data.download=false
      data.image_size=32 data.val_fraction=0.1 track.mode=disabled "run_root=$RUNS")

steps=() overrides=()
for a in "$@"; do case "$a" in init|source|probe|qat|qat-kd|ptq|peers) steps+=("$a") ;; *) overrides+=("$a") ;; esac; done
[ ${#steps[@]} -gt 0 ] || steps=(init source probe qat qat-kd)

for step in "${steps[@]}"; do
  case "$step" in
    init)
      [ -f "$RUNS/init/r18-w05/model.pt" ] || python bench/init_artifact.py "$RUNS/init/r18-w05" --width 0.5 ;;
    source)  # lr 0.2 per 256 and weight decay: training from scratch, not fine-tuning
      python -m finetune configs/finetune/cifar10.yaml "${data[@]}" artifact="$RUNS/init/r18-w05" \
        name=r18-w05-supervised train.epochs=3 train.lr=0.2 train.weight_decay=5e-4 eval.knn_every_epochs=0 ;;
    probe)
      [ -f "$RUNS/probe/r18-w05-supervised/metrics.json" ] || python -m probe configs/pipelines/cifar10.yaml \
        "${data[@]}" artifact="$RUNS/finetune/r18-w05-supervised" name=r18-w05-supervised ;;
    qat)
      python -m quant configs/quant/cifar10_r18.yaml "${data[@]}" source="$RUNS/finetune/r18-w05-supervised" \
        'teacher=""' name=r18-w05-int8 loss.kd=0 loss.ce=1 train.epochs=1 "${overrides[@]}" ;;
    qat-kd)
      python -m quant configs/quant/cifar10_r18.yaml "${data[@]}" source="$RUNS/finetune/r18-w05-supervised" \
        teacher="$RUNS/finetune/r18-w05-supervised" name=r18-w05-int8-kd loss.kd=1 loss.ce=0 train.epochs=1 \
        "${overrides[@]}" ;;
    ptq)
      python -m quant configs/quant/cifar10_r18.yaml "${data[@]}" source="$RUNS/finetune/r18-w05-supervised" \
        'teacher=""' name=r18-w05-int8-ptq quant.mode=ptq quant.calib_batches=8 "${overrides[@]}" ;;
    peers)
      python bench/int8_peers.py --qat "$RUNS/quant/r18-w05-int8" --ptq "$RUNS/quant/r18-w05-int8-ptq" \
        --out "$RUNS/peers" ;;
  esac
done
