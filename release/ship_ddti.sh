#!/usr/bin/env bash
# Rebuild the bundled model raythyroid/models/ddti from ../shared/data/ddti, end to end:
# preprocess (default settings) -> 5-fold case-disjoint cv on the train + val splits (each fold
# model trained EPOCHS epochs; cv saves the five as one ensemble) -> the ensemble, --fast and
# each member alone scored on the untouched test split, original frames against original
# masks -> images/s of the ensemble and --fast -> weights (fp16), the figures measured
# (card-figures.json) and model.json + CARD.md rendered from them into the package
# (release/ship_card.py; --render DEST renders them again after a figure changes) -> the
# network `--fast` runs, distilled from that ensemble (release/ship_student.sh).
#
#   release/ship_ddti.sh [WORKDIR]    # default .cache/ship-ddti
#
# Every fold starts from a U-Net first trained PRETRAIN_EPOCHS epochs on TG3K's thyroid-gland
# masks (cv --init), not from random weights (+0.026 CV n_IoU on DDTI; 0 skips it).
#
# Resumable: rerun the same command after a stop; finished folds and steps are kept.
# Environment: DDTI and TG3K (the frames' folders), EPOCHS (default 50), PRETRAIN_EPOCHS
# (default 8; 0: none), SIZE (the DDTI models' input side, default 256; the TG3K pretraining
# stays at 256: a U-Net's weights serve any input size), DEST (default the package's
# raythyroid/models/ddti; another folder keeps a candidate out of the package until it is
# chosen), CV_FLAGS (more `raythyroid cv` flags for the DDTI folds, e.g. "--deep-supervision
# 2"; the card's rebuild line repeats them).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ddti="${DDTI:-$root/../shared/data/ddti}"
tg3k="${TG3K:-$root/../shared/data/tg3k}"
work="${1:-$root/.cache/ship-ddti}"
epochs="${EPOCHS:-50}"
pretrain_epochs="${PRETRAIN_EPOCHS:-8}"
size="${SIZE:-256}"
read -r -a cv_flags <<< "${CV_FLAGS:-}"
dest="${DEST:-$root/raythyroid/models/ddti}"
bin="$root/.venv/bin"
[ -d "$ddti/images" ] || { echo "ship_ddti: no DDTI frames at $ddti (set DDTI)" >&2; exit 2; }
# TG3K: the pretraining's gland masks, and the student's unlabelled frames (ship_student.sh)
[ -d "$tg3k/images" ] || { echo "ship_ddti: no TG3K frames at $tg3k (set TG3K)" >&2; exit 2; }
mkdir -p "$work"
timings="$work/timings.txt"

# preprocessing's time (training's own clock, history.jsonl, counts every resume: ship_card.py)
timed() {  # step name, command...: seconds of a completed run appended to timings.txt
  local step=$1 started
  shift
  started=$(date +%s)
  "$@"
  echo "$step $(( $(date +%s) - started ))" >> "$timings"
}

[ -f "$work/prepared/manifest.json" ] ||
  timed preprocess "$bin/raythyroid" preprocess "$ddti" "$work/prepared" --size "$size"
init=()
if [ "$pretrain_epochs" != 0 ]; then
  # TG3K is pretraining only, never a measure (its frames are near-duplicates from a few
  # videos): a random 90/10 split whose validation just watches the gland loss
  [ -f "$work/tg3k-prepared/manifest.json" ] ||
    timed preprocess-tg3k "$bin/raythyroid" preprocess "$tg3k" "$work/tg3k-prepared" \
      --split 0.9,0.1,0
  "$bin/raythyroid" train "$work/tg3k-prepared" "$work/pretrain" --workers 2 \
    --epochs "$pretrain_epochs"
  init=(--init "$work/pretrain/model")
fi
# the card's rebuild line repeats them as given (ship_card.py)
printf '%s' "${CV_FLAGS:-}" > "$work/cv-flags"
"$bin/raythyroid" cv "$work/prepared" "$work/cv" --folds 5 --workers 1 \
  --epochs "$epochs" "${init[@]}" "${cv_flags[@]}"
"$bin/python" "$root/release/ship_card.py" --test-frames "$work"
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
"$bin/python" "$root/release/ship_card.py" "$work" "$dest"
# the one-pass network `--fast` runs, distilled from the ensemble just shipped
DDTI="$ddti" TG3K="$tg3k" DEST="$dest" "$root/release/ship_student.sh" "$work"
