#!/usr/bin/env bash
# SparCode training ablation from the two-tower warm start on movielens-100k (dnn, mlp), seeds 0-2: one command.
#   experiments/scripts/training_ablation.sh <home> <runs> <data mirror>   (e.g. ~/.cache/sparcode-abl runs-abl ../shared/data)
# Prints the tables of experiments/results/movielens-100k-sparcode-warm-start.md to stdout (~14 min on 2 cores).
set -euo pipefail
HOME_=${1:?sparcode home}; RUNS=${2:?runs folder}; MIRROR=${3:?data mirror}
cd "$(dirname "$0")/../.."
export SPARCODE_HOME="$HOME_" OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
PY=.venv/bin/python
$PY experiments/scripts/training_ablation.py --runs "$RUNS" --mirror "$MIRROR" --summary "$RUNS/ablation_summary.json" >&2
$PY experiments/scripts/warm_start_seeds.py --summary "$RUNS/ablation_summary.json" --out "$RUNS/warm_start.json" >&2
$PY experiments/scripts/training_ablation_report.py --summary "$RUNS/ablation_summary.json" --warm "$RUNS/warm_start.json"
