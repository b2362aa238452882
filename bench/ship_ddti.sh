#!/usr/bin/env bash
# Rebuild the bundled model raythyroid/models/ddti from ../shared/data/ddti, end to end:
# preprocess (default settings) -> 5-fold case-disjoint cv on the train + val splits (each fold
# model trained EPOCHS epochs; cv saves the five as one ensemble) -> the ensemble, --fast and
# each member alone scored on the untouched test split, original frames against original
# masks -> images/s of the ensemble and --fast -> weights (fp16) + model.json + CARD.md into
# the package.
#
#   bench/ship_ddti.sh [WORKDIR]    # default .cache/ship-ddti
#
# Resumable: rerun the same command after a stop; finished folds and steps are kept.
# Environment: DDTI (the frames' folder), EPOCHS (default 50).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ddti="${DDTI:-$root/../shared/data/ddti}"
work="${1:-$root/.cache/ship-ddti}"
epochs="${EPOCHS:-50}"
bin="$root/.venv/bin"
[ -d "$ddti/images" ] || { echo "ship_ddti: no DDTI frames at $ddti (set DDTI)" >&2; exit 2; }
mkdir -p "$work"
timings="$work/timings.txt"

timed() {  # step name, command...: seconds of a completed run appended to timings.txt
  local step=$1 started
  shift
  started=$(date +%s)
  "$@"
  echo "$step $(( $(date +%s) - started ))" >> "$timings"
}

[ -f "$work/prepared/manifest.json" ] ||
  timed preprocess "$bin/raythyroid" preprocess "$ddti" "$work/prepared"
timed cv "$bin/raythyroid" cv "$work/prepared" "$work/cv" --folds 5 --workers 1 \
  --epochs "$epochs"
"$bin/python" - "$work" <<'PY'
import sys
from raythyroid import shards
work = sys.argv[1]
manifest = shards.read_manifest(f"{work}/prepared")
rows = shards.read_rows(f"{work}/prepared", manifest, "test", ["source_uri"])
open(f"{work}/test-frames.txt", "w").write("".join(r["source_uri"] + "\n" for r in rows))
PY
for variant in ensemble fast; do
  flag=""
  [ "$variant" = fast ] && flag="--fast"
  "$bin/raythyroid" infer "$work/cv/model" "$work/test-frames.txt" "$work/test-$variant" \
    --labels "$ddti/masks" $flag
done
# each member alone, with the inference its own fold chose: what the ensemble adds
for fold in "$work"/cv/fold-*; do
  "$bin/raythyroid" infer "$fold/model" "$work/test-frames.txt" \
    "$work/test-member-${fold##*-}" --labels "$ddti/masks"
done
"$bin/python" "$root/bench/ensemble_bench.py" --model "$work/cv/model" \
  --frames "$work/test-frames.txt" --json "$work/throughput.json"
"$bin/python" "$root/bench/ship_card.py" "$work" "$root/raythyroid/models/ddti"
