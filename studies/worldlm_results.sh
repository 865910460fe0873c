#!/usr/bin/env bash
# Issue 3 results study: every command behind docs/results.md, in the order it was run.
# Usage (from the repository root, with worldlm installed):  bash studies/worldlm_results.sh
# Needs the two corpora trees: ../shared/corpora (default) or the output of
# `worldlm data build domains|languages` (CORPORA=$PWD/data). Runs one after another: two torch
# processes on two cores slow each other down many times over.
set -euo pipefail
CORPORA=${CORPORA:-$(cd ../shared/corpora && pwd)}
OUT=${OUT:-runs/results}
BUDGET=(--set model.preset=mini --set stop.rounds=6)

# 1. All six methods on both trees.
for tree in domains languages; do
  worldlm compare "configs/$tree.toml" --set "data.root=$CORPORA/$tree" "${BUDGET[@]}" \
    --out "$OUT/$tree" --quiet
done

# 2. Ablations of WorldLM, one setting changed at a time (the main run is the reference).
ablate() {  # tree, name, overrides...
  local tree=$1 name=$2
  shift 2
  worldlm compare "configs/$tree.toml" --set "data.root=$CORPORA/$tree" "${BUDGET[@]}" "$@" \
    --methods worldlm --out "$OUT/ablations/$tree/$name" --quiet
}
for tree in domains languages; do
  ablate "$tree" key_fraction-0 --set worldlm.key_fraction=0
  ablate "$tree" key_fraction-0.15 --set worldlm.key_fraction=0.15
  ablate "$tree" key_fraction-0.5 --set worldlm.key_fraction=0.5
  ablate "$tree" plain-average-K --set worldlm.tau=1e9
  ablate "$tree" routing-0.1 --set worldlm.lambda_route=0.1
  ablate "$tree" own-K --set worldlm.leaf_key_layers=own
done

# 3. Robustness: one leaf swapped between the sub-federations. Only the tree-shaped methods can
# change (centralized, local, fedavg and fedper flatten the tree; hierfavg with one inner round
# and full participation equals fedavg exactly), so WorldLM is the one rerun.
for tree in domains languages; do
  worldlm compare "configs/$tree-swap.toml" --set "data.root=$CORPORA/$tree" "${BUDGET[@]}" \
    --methods worldlm --out "$OUT/swap/$tree" --quiet
done

# 4. The tables of docs/results.md from the runs above.
python studies/results_tables.py "$OUT" docs/results
