#!/usr/bin/env bash
# Issue 3 results study: every command behind docs/results.md, in the order it was run.
# Usage (from the repository root, with worldlm installed):  bash studies/worldlm_results.sh
# Needs the two corpora trees: ../shared/corpora (default) or the output of
# `worldlm data build domains|languages` (CORPORA=$PWD/data). Runs one after another: two torch
# processes on two cores slow each other down many times over.
set -euo pipefail
CORPORA=${CORPORA:-$(cd ../shared/corpora && pwd)}
OUT=${OUT:-runs/results}
# WorldLM's settings before issue 18's study changed its defaults (docs/study.md), pinned so that
# this script still reproduces docs/results.md; later --set options override them.
PAPER_DEFAULTS=(--set worldlm.key_fraction=0.3 --set worldlm.leaf_key_layers=federation
  --set worldlm.child_key_layers=shared --set worldlm.key_mix=1 --set train.finetune_rounds=0)
BUDGET=(--set model.preset=mini --set stop.rounds=6 "${PAPER_DEFAULTS[@]}")

# 1. All six methods on both trees.
for tree in domains languages; do
  worldlm compare "configs/$tree.toml" --set "data.root=$CORPORA/$tree" "${BUDGET[@]}" \
    --out "$OUT/$tree" --quiet
done

# 2. Ablations of WorldLM, one setting changed at a time (the main run is the reference).
ablate() {  # tree, name, methods, overrides...
  local tree=$1 name=$2 methods=$3
  shift 3
  worldlm compare "configs/$tree.toml" --set "data.root=$CORPORA/$tree" "${BUDGET[@]}" "$@" \
    --methods "$methods" --out "$OUT/ablations/$tree/$name" --quiet
}
for tree in domains languages; do
  ablate "$tree" key_fraction-0 worldlm --set worldlm.key_fraction=0
  ablate "$tree" key_fraction-0.15 worldlm --set worldlm.key_fraction=0.15
  ablate "$tree" key_fraction-0.5 worldlm --set worldlm.key_fraction=0.5
  ablate "$tree" plain-average-K worldlm --set worldlm.tau=1e9
  ablate "$tree" routing-0.1 worldlm --set worldlm.lambda_route=0.1
  ablate "$tree" own-K worldlm --set worldlm.leaf_key_layers=own
done
# Then (added once the first ablations had been read): the attention step, inner rounds at the
# same token budget per leaf (2 x 6 steps per root round instead of 1 x 12), the learning rate
# (FedAvg rerun at the same rate so the ratio stays fair), and per-leaf attended K.
declare -A SUBFEDS=([domains]="general medical" [languages]="high low")
for tree in domains languages; do
  ablate "$tree" eps-0.5 worldlm --set worldlm.eps=0.5
  inner=(--set train.local_steps=6)
  for sub in ${SUBFEDS[$tree]}; do inner+=(--set "nodes.world/$sub.inner_rounds=2"); done
  ablate "$tree" inner-rounds-2 worldlm "${inner[@]}"
  ablate "$tree" lr-4e-3 fedavg,worldlm --set train.lr=4e-3
  ablate "$tree" attended-K worldlm --set worldlm.child_key_layers=attended
  # The fair references for inner rounds: the same 72 steps per leaf in 12 rounds of 6, so
  # that leaves are aggregated as often as with 2 inner rounds (FedAvg, and WorldLM without
  # the inner rounds).
  ablate "$tree" rounds-12x6 fedavg,worldlm --set train.local_steps=6 --set stop.rounds=12
  # The two levers that helped, together.
  ablate "$tree" inner-rounds-2-attended-K worldlm "${inner[@]}" \
    --set worldlm.child_key_layers=attended
done

# 3. Robustness: one leaf swapped between the sub-federations. Only the tree-shaped methods can
# change (centralized, local, fedavg and fedper flatten the tree; hierfavg with one inner round
# and full participation equals fedavg exactly), so WorldLM is the one rerun.
for tree in domains languages; do
  worldlm compare "configs/$tree-swap.toml" --set "data.root=$CORPORA/$tree" "${BUDGET[@]}" \
    --methods worldlm --out "$OUT/swap/$tree" --quiet
done

# 4. A second regime: little data per leaf (150k characters, as a small organization might
# have), a 4x smaller model and 20 rounds, so that each leaf sees its data about 7 times.
SCARCE=(--set model.preset=tiny --set data.max_chars=150000 --set stop.rounds=20
  --set eval.every=5 "${PAPER_DEFAULTS[@]}")
worldlm compare configs/domains.toml --set "data.root=$CORPORA/domains" "${SCARCE[@]}" \
  --methods local,fedavg,fedper,worldlm --out "$OUT/scarce/domains" --quiet
worldlm compare configs/domains.toml --set "data.root=$CORPORA/domains" "${SCARCE[@]}" \
  --set worldlm.child_key_layers=attended --methods worldlm \
  --out "$OUT/scarce/domains-attended-K" --quiet

# 5. The tables of docs/results.md from the runs above.
python studies/results_tables.py "$OUT" docs/results
