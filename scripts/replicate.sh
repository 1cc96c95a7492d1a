#!/usr/bin/env bash
# The miniature replication of DS-VLM's claim (docs/replication.md): five arms x three seeds on the
# faithful tiny default, equal steps and data, in a low-instruction-data regime (1,024 labelled chats, all
# 2,000 captioned images in stage 1; 150 + 600 steps). Cells run two at a time through `dsvlm ablate --cell` (the fan-out
# a cluster user would do with their launcher), then one report.
set -euo pipefail
OUT=${DSVLM_REPLICATION_DIR:-runs/replication}
JOBS=${DSVLM_JOBS:-2}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
start=$(date +%s)

data=$(dsvlm prepare synthetic "$OUT/data" --overwrite)
diffusion=$(dsvlm pretrain-diffusion "$data" --out "$OUT/diffusion")
common=("data.dataset=$data" "supervision.diffusion.pretrained=$diffusion" "stages.0.max_steps=150"
        "stages.1.max_steps=600" "stages.1.max_records=1024" "ablate.probe_train=512" "ablate.probe_test=256")
arms=(
  --arm "llava=supervision.enabled=false,stages.1.train=[connector,llm]"
  --arm "llava-enc=supervision.enabled=false"
  --arm "ds"
  --arm "ds-connector=supervision.vision_layers=[]"
  --arm "ds-layers=supervision.connector=false"
)
seeds=0,1,2
for arm in llava llava-enc ds ds-connector ds-layers; do
  for seed in ${seeds//,/ }; do echo "$arm:$seed"; done
done | xargs -P "$JOBS" -I{} dsvlm ablate tiny-synthetic "${common[@]}" "${arms[@]}" --seeds "$seeds" \
  --baseline llava --out "$OUT/grid" --cell {} --no-progress >/dev/null
report=$(dsvlm ablate tiny-synthetic "${common[@]}" "${arms[@]}" --seeds "$seeds" --baseline llava \
         --out "$OUT/grid" --report-only)
echo "replication finished in $(( $(date +%s) - start )) s: $report" >&2
echo "$report"
