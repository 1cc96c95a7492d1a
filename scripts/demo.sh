#!/usr/bin/env bash
# The whole DS-VLM lifecycle on the built-in synthetic set with the `tiny-synthetic` recipe:
# prepare -> pretrain the toy diffusion model (reused when present) -> stage 1 -> stage 2 with diffusion
# supervision from the frozen diffusion model -> strip -> eval through lmms-eval.
# Each step is a dsvlm command whose stdout (a path) feeds the next one.
set -euo pipefail
OUT=${DSVLM_DEMO_DIR:-runs/demo}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
start=$(date +%s)

data=$(dsvlm prepare synthetic "$OUT/data" --overwrite)
diffusion=$(dsvlm pretrain-diffusion "$data" --out "$OUT/diffusion")
run=$(dsvlm train tiny-synthetic "data.dataset=$data" "supervision.diffusion.pretrained=$diffusion" \
      "run.output_dir=$OUT/run" --overwrite)
model=$(dsvlm strip "$run" --out "$OUT/model" --overwrite)
summary=$(dsvlm eval "$model" --bench synthetic --data-files "synthetic=$data/eval/synthetic.parquet" \
          --out "$OUT/eval")

cat <<MSG >&2

DS-VLM demo finished in $(( $(date +%s) - start )) s.
  diffusion model:        $diffusion  (samples.png: trained vs random UNet on held-out captions)
  stripped model:         $model
  loss curves:            $OUT/run/align/loss.png  $OUT/run/instruct/loss.png
  reconstruction grid:    $OUT/run/instruct/reconstructions.png
  evaluation summary:     $summary
MSG
