#!/usr/bin/env bash
# The study's methods at the WorldLM paper's model sizes on one GPU (bf16 autocast on CUDA).
#
# Usage (from the repository root, with worldlm installed and CUDA present):
#   bash studies/gpu_paper_scale.sh [TREE]            # languages (default) or domains
# Environment:
#   PRESET   75m (default) or 125m: the paper's sizes (~75M / ~125M parameters at 32k vocab)
#   METHODS  default: local,fedavg,fedper,fedavg_ft,worldlm
#   CORPORA  the corpora root (default ../shared/corpora)
#   DRY_RUN=1  the same commands on the CPU with the tiny preset and 2 short rounds: checks the
#            script end to end on a machine without a GPU (what CI-like machines can run).
# Budget per method, sized to stay under 10 minutes on an H100-class card: 24 rounds x 32 local
# steps x 16 blocks of 512 tokens per leaf (6.3M tokens per leaf), an 8k-token BPE.
set -euo pipefail
TREE=${1:-languages}
PRESET=${PRESET:-75m}
METHODS=${METHODS:-local,fedavg,fedper,fedavg_ft,worldlm}
CORPORA=${CORPORA:-$(cd ../shared/corpora && pwd)}
OUT=${OUT:-runs/gpu-$PRESET}

ARGS=(--set "data.root=$CORPORA/$TREE" --set "model.preset=$PRESET" --set model.block_size=512
  --set tokenizer.vocab_size=8192 --set data.max_chars=8000000 --set stop.rounds=24
  --set train.local_steps=32 --set train.batch_size=16 --set train.lr=6e-4
  --set train.warmup_steps=32 --set eval.every=4 --set eval.max_blocks=64
  --set run.device=cuda)
if [[ ${DRY_RUN:-0} == 1 ]]; then
  OUT=${OUT}-dry-run
  ARGS+=(--set model.preset=tiny --set model.block_size=64 --set tokenizer.vocab_size=512
    --set data.max_chars=100000 --set stop.rounds=2 --set train.local_steps=2
    --set train.batch_size=4 --set eval.every=1 --set eval.max_blocks=8 --set run.device=cpu)
else
  python - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device: run with DRY_RUN=1 to check the script on a CPU"
print(f"device: {torch.cuda.get_device_name(0)}")
EOF
fi

start=$(date +%s)
worldlm compare "configs/$TREE.toml" "${ARGS[@]}" --methods "$METHODS" --out "$OUT/$TREE"
echo "all methods: $(( $(date +%s) - start )) s"
cat "$OUT/$TREE/results.md"
