#!/usr/bin/env bash
# The MatFormer experiment of docs/experiments/matformer.md
# (Devvrit et al. 2023: the sub-models a nested model
# holds match models of their size trained on their own). Trains the nested char-LM of
# configs/matformer/nested.json (the mean of every granularity's loss each step, or the
# weighted mean of `train.matformer_weights`), extracts each
# granularity as a dense model (`formers compress extract`), trains a dense model of each
# size (configs/matformer/dense-*.json) for the same steps, and prints a Markdown table of
# held-out losses.
#
#   scripts/matformer_experiment.sh [OUT] [STEPS] [EVAL_BATCHES]
#
# OUT defaults to runs/matformer-experiment (runs there are continued, so a stopped
# experiment picks up where it was), STEPS to the configs' 600, EVAL_BATCHES to 40 (of 8×256 bytes of
# the held-out tenth of Shakespeare). FORMERS names the binary [default: formers on PATH].
set -euo pipefail

formers=${FORMERS:-formers}
out=${1:-runs/matformer-experiment}
steps=${2:-600}
batches=${3:-40}
here=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"

train() { # config, run directory: trained to the end, continuing a stopped run
    start=--force
    if [ -f "$2/checkpoint/state.json" ]; then start=--resume; fi
    "$formers" train --config "$1" --steps "$steps" --out "$2" "$start" \
        --sample-tokens 0 --quiet >/dev/null
}
loss() { # run directory: the held-out loss `formers eval` prints
    "$formers" eval --model "$1" --batches "$batches" | sed -n 's/.*"loss":\([0-9.eE+-]*\).*/\1/p'
}
params() { # run directory: parameters, as `formers compress extract` counts them
    sed -n 's/.*; \([0-9]*\) parameters.*/\1/p' "$1"
}

train "$here/configs/matformer/nested.json" "$out/nested"
widths=(64 128 256 512)
echo "| granularity | hidden | parameters | extracted: held-out loss | dense, same steps | extracted vs dense |"
echo "|---|---:|---:|---:|---:|---:|"
for g in 0 1 2 3; do
    h=${widths[$g]}
    if [ ! -f "$out/extracted-$g/run.json" ]; then
        "$formers" compress extract --model "$out/nested" --granularity "$g" \
            --out "$out/extracted-$g" >"$out/extracted-$g.txt"
    fi
    train "$here/configs/matformer/dense-$h.json" "$out/dense-$h"
    a=$(loss "$out/extracted-$g")
    b=$(loss "$out/dense-$h")
    awk -v g="$g" -v h="$h" -v p="$(params "$out/extracted-$g.txt")" -v a="$a" -v b="$b" \
        'BEGIN { printf "| %d | %d | %d | %.4f | %.4f | %+.1f%% |\n", g, h, p, a, b, 100 * (a - b) / b }'
done
