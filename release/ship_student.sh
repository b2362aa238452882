#!/usr/bin/env bash
# The bundled model's one-pass network, what `raythyroid infer ddti --fast` runs: a student
# distilled from the shipped ensemble, end to end (release/ship_ddti.sh ends with it; alone, it
# distils the ensemble DEST already holds):
# the ensemble as built (DEST's members, without an earlier student) -> DDTI preprocessed with
# default settings -> `raythyroid distill` over the train split's frames (the validation
# split picks its epoch and inference) and every 9th TG3K frame as unlabelled ones (the
# recipe bench/BENCHMARKS.md measured, "distillation, the second recipe") -> its weights in fp16, as they ship -> scored on the untouched test split, timed
# beside the ensemble and its first member (bench/ensemble_bench.py), compared with the
# ensemble frame by frame (raythyroid compare) -> the figures into DEST's
# record and the card and model.json rendered again (release/ship_card.py --student).
#
#   release/ship_student.sh [WORKDIR]    # default .cache/ship-ddti (ship_ddti.sh's)
#
# Resumable: rerun the same command after a stop; finished steps are kept, and a step redone
# redoes the steps after it. A WORKDIR belongs to one ensemble: another one in DEST is refused.
# Environment: DDTI and TG3K (the frames' folders), DEST (default the package's
# raythyroid/models/ddti), STUDENT_EPOCHS (default 6).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
ddti="${DDTI:-$root/../shared/data/ddti}"
tg3k="${TG3K:-$root/../shared/data/tg3k}"
work="${1:-$root/.cache/ship-ddti}"
dest="${DEST:-$root/raythyroid/models/ddti}"
epochs="${STUDENT_EPOCHS:-6}"
bin="$root/.venv/bin"
[ -d "$ddti/images" ] || { echo "ship_student: no DDTI frames at $ddti (set DDTI)" >&2; exit 2; }
[ -d "$tg3k/images" ] || { echo "ship_student: no TG3K frames at $tg3k (set TG3K)" >&2; exit 2; }
[ -f "$dest/model.json" ] || { echo "ship_student: no model at $dest (set DEST)" >&2; exit 2; }
mkdir -p "$work"

fresh() {  # OUT IN...: OUT exists and is newer than every IN (else its step runs again)
  local out=$1 input
  shift
  [ -e "$out" ] || return 1
  for input in "$@"; do [ "$out" -nt "$input" ] || return 1; done
}
# the teacher is the ensemble alone: a student shipped before must not teach the next one (a
# WORKDIR whose teacher is not DEST's ensemble any more is refused)
"$bin/python" "$root/release/ship_card.py" --teacher "$dest" "$work/teacher"
[ -f "$work/prepared/manifest.json" ] ||
  "$bin/raythyroid" preprocess "$ddti" "$work/prepared"
[ -f "$work/test-frames.txt" ] || "$bin/python" "$root/release/ship_card.py" --test-frames "$work"
# every 9th TG3K frame in name order: other frames of the same videos add little (TG3K's
# README: many frames are flipped, rotated or noisy copies); a third of them scored lower
find "$tg3k/images" -maxdepth 1 -type f | LC_ALL=C sort | awk 'NR % 9 == 1' > "$work/unlabelled.txt"
"$bin/raythyroid" distill "$work/teacher" "$work/prepared" "$work/student" --from-teacher \
  --unlabelled "$work/unlabelled.txt" --epochs "$epochs" --lr 1e-4 --min-confidence 0.5
# model.json is written last: the step's mark of completion
fresh "$work/student-fp16/model.json" "$work/student/model/weights.pt" \
  "$work/student/model/model.json" ||
  "$bin/python" "$root/release/ship_card.py" --half "$work/student/model" "$work/student-fp16"
# an OUTPUT keeps one model's masks: a student made again is scored afresh (as is one whose
# scoring stopped before its metrics: 31 frames)
fresh "$work/test-student/metrics.json" "$work/student-fp16/model.json" ||
  rm -rf "$work/test-student"
"$bin/raythyroid" infer "$work/student-fp16" "$work/test-frames.txt" "$work/test-student" \
  --labels "$ddti/masks"
# timed over 120 DDTI frames: on the test split's 31 a job's start-up is most of the
# student's time
find "$ddti/images" -maxdepth 1 -type f | LC_ALL=C sort | awk 'NR <= 120' > "$work/speed-frames.txt"
fresh "$work/student-throughput.json" "$work/student-fp16/model.json" ||
  "$bin/python" "$root/bench/ensemble_bench.py" --model "$work/teacher" \
    --student "$work/student-fp16" --frames "$work/speed-frames.txt" \
    --json "$work/student-throughput.json"
# frame by frame on the test split against the ensemble and against its first member alone
# (what --fast ran before), with bootstrap intervals; exit 4 (the student is not better beyond
# the interval) is a finding here, not a failure
fresh "$work/student-vs-ensemble.json" "$work/student-fp16/model.json" ||
  "$bin/raythyroid" compare "$work/teacher" "$work/student-fp16" "$work/prepared" \
    --split test --json "$work/student-vs-ensemble.json" || [ $? -eq 4 ]
[ -f "$work/first-member/model.json" ] ||
  "$bin/python" "$root/release/ship_card.py" --one-pass "$work/teacher" "$work/first-member"
fresh "$work/student-vs-first.json" "$work/student-fp16/model.json" ||
  "$bin/raythyroid" compare "$work/first-member" "$work/student-fp16" "$work/prepared" \
    --split test --json "$work/student-vs-first.json" || [ $? -eq 4 ]
"$bin/python" "$root/release/ship_card.py" --student "$work" "$dest"
