"""Shared bits of the benchmarks: machine description, data set-up (phantom shards and
archives, a small trained model, a synthetic results folder), fold models and their held-out
frames, and BENCHMARKS.md. The one module the bench scripts share: no script imports
another."""
from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except Exception:
        gpu = "no GPU"
    return f"{os.cpu_count()} cores ({cpu}), {gpu}, Python {platform.python_version()}"


def median(values) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def portable(arg: str) -> str:
    """A command-line argument as BENCHMARKS.md may show it: no path of the measuring machine
    (inside the repository relative to it, elsewhere its name under WORKDIR, the folder the
    bench was pointed at: `/data/ship/cv` -> `WORKDIR/cv`, as BENCHMARKS.md's lines read)."""
    if not os.path.isabs(arg):
        return arg
    path = Path(arg)
    if path.is_relative_to(HERE.parent):
        return str(path.relative_to(HERE.parent))
    return "WORKDIR/" + path.name


def record(title: str, table_lines: list[str], notes: list[str] = ()) -> None:
    """Print the table and append it, with machine, date and command, to BENCHMARKS.md."""
    command = "python " + " ".join(shlex.quote(portable(a)) for a in [
        os.path.relpath(sys.argv[0], HERE.parent)] + sys.argv[1:])
    block = [f"### {title}", "",
             f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
             f"- machine: {machine()}", f"- command: `{command}`", ""]
    block += table_lines + [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    text = "\n".join(block) + "\n"
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmarks\n\nAppended by the scripts in bench/; newest last.\n\n")
    with RESULTS.open("a") as f:
        f.write(text)


def phantom_shards(count: int, size: int, workdir: str | None = None, seed: int = 0) -> str:
    """Phantom frames preprocessed by the real pipeline; returns the preprocess OUTPUT."""
    from raythyroid import phantom, preprocess, runtime
    from raythyroid.imaging import PrepConfig

    root = Path(workdir or tempfile.mkdtemp(prefix="raythyroid-bench-"))
    raw, prepared = root / "raw", root / "prepared"
    if not (prepared / "manifest.json").exists():
        phantom.write_folders(str(raw), count, seed=seed)
        with runtime.session():
            preprocess.run(str(raw), str(prepared), config=PrepConfig(size=size),
                           log=lambda *_: None)
    return str(prepared)


def phantom_archive(workdir: str, frames: int, seed: int) -> str:
    """A folders-layout archive of phantom frames (images/ + masks/) under workdir, kept
    between runs; returns its root."""
    from raythyroid import phantom

    os.makedirs(workdir, exist_ok=True)
    archive = os.path.join(workdir, f"archive-{frames}")
    if not os.path.isdir(archive):
        phantom.write_folders(archive, frames, seed=seed)
    return archive


def make_model(size: int, workdir: str) -> str:
    """A U-Net with the project's model folder layout; trained weights are not needed to time
    it, but post-processing cost depends on what it predicts, so it is trained for a few
    epochs on phantoms."""
    from raythyroid import phantom, preprocess, runtime, train, training
    from raythyroid.imaging import PrepConfig

    model_dir = os.path.join(workdir, "run", "model")
    if not os.path.exists(os.path.join(model_dir, "model.json")):
        with runtime.session():
            phantom.write_folders(os.path.join(workdir, "train-raw"), 120, seed=5)
            preprocess.run(os.path.join(workdir, "train-raw"), os.path.join(workdir, "prep"),
                           config=PrepConfig(size=size), log=lambda *_: None)
            train.run(os.path.join(workdir, "prep"), os.path.join(workdir, "run"),
                      training.TrainConfig(epochs=3), workers=1, log=lambda *_: None)
    return model_dir


def write_results_folder(output: str, rows: int, per_file: int) -> None:
    """A synthetic results folder (results files of `per_file` rows, as the infer job writes
    them) with realistic columns: 2% errors, 1% skipped, labels on every ok row."""
    import numpy as np
    import pyarrow as pa

    from raythyroid import results

    rng = np.random.default_rng(0)
    for start in range(0, rows, per_file):
        n = min(per_file, rows - start)
        index = np.arange(start, start + n)
        status = np.where(index % 50 == 7, "error", np.where(index % 100 == 3, "skipped", "ok"))
        ok = status == "ok"
        tp = np.where(ok, rng.integers(0, 4000, n), 0)
        columns = {name: pa.nulls(n, results.RESULT_SCHEMA.field(name).type)
                   for name in results.RESULT_SCHEMA.names}
        area = np.where(ok & (tp > 0), rng.integers(50, 20_000, n), 0)
        columns.update(
            key=pa.array([f"archive/{i // 1000:04d}/frame-{i:07d}" for i in index]),
            source_uri=pa.array([f"s3://bucket/archive/{i // 1000:04d}/frame-{i:07d}.dcm"
                                 for i in index]),
            status=pa.array(status),
            error=pa.array([None if s == "ok" else ("truncated PNG (no IEND chunk)" if s == "error"
                                                    else "not an image (SR)") for s in status]),
            nodule=pa.array(np.where(ok, tp > 0, None).tolist(), pa.bool_()),
            tp=pa.array(np.where(ok, tp, None).tolist(), pa.int64()),
            fp=pa.array(np.where(ok, rng.integers(0, 500, n), None).tolist(), pa.int64()),
            fn=pa.array(np.where(ok, rng.integers(0, 500, n), None).tolist(), pa.int64()),
            tn=pa.array(np.where(ok, 200_000 - tp, None).tolist(), pa.int64()),
            n_components=pa.array(np.where(ok, (area > 0) * rng.integers(1, 3, n), None).tolist(),
                                  pa.int32()),
            area_px=pa.array(np.where(ok, area, None).tolist(), pa.int64()),
            aspect_ratio=pa.array(np.where(ok & (area > 0), rng.lognormal(-0.2, 0.3, n),
                                           None).tolist(), pa.float64()),
            confidence=pa.array(np.where(ok, rng.beta(8, 2, n), None).tolist(), pa.float64()),
            iou=pa.array(np.where(ok, rng.beta(5, 2, n), None).tolist(), pa.float64()))
        results.write_results(output, pa.table(columns, schema=results.RESULT_SCHEMA))


def cached_folder(workdir: str, rows: int, per_file: int, finish=None) -> tuple[str, str]:
    """(the synthetic results folder of these sizes, its note): written once and reused by
    later runs; `finish(output)` adds what a bench needs beyond the results and returns the
    note kept with them."""
    output = os.path.join(workdir, f"out-{rows}-{per_file}")
    marker = os.path.join(output, "_written")
    if not os.path.exists(marker):
        shutil.rmtree(output, ignore_errors=True)
        started = time.time()
        write_results_folder(output, rows, per_file)
        note = finish(output) if finish else ""
        with open(marker, "w") as f:
            f.write(note)
        print(f"wrote {rows} rows in {time.time() - started:.0f} s {note}", flush=True)
    with open(marker) as f:
        return output, f.read()


def views(net, images, zoom: float = 0.0):
    """(2, N, H, W): the nodule probabilities infer computes for the frames ((N, H, W) uint8)
    and for their mirror images, mirrored back (flip TTA averages the two; an ensemble's are
    its members' mean); with `zoom` (3, N, H, W): then also TTA's zoomed-out view (itself with
    flip TTA)."""
    import numpy as np
    import torch

    from raythyroid import model

    frames, cpu = torch.from_numpy(images), torch.device("cpu")
    with torch.no_grad():
        found = [model.nodule_probability(net, frames, cpu).numpy(),
                 model.nodule_probability(net, frames.flip(dims=[2]), cpu).flip(dims=[2]).numpy()]
        if zoom:
            found.append(model.zoomed_out_probability(net, frames, cpu, zoom,
                                                      flip_tta=True).numpy())
    return np.stack(found)


def every_fold(source: str) -> tuple[int, list[tuple], list[int | None]]:
    """(the seed that dealt the folds, [(model, metadata)] in fold order, each fold's held-out
    frames where known) of a finished cv RUN (or `distill --folds` RUN), or of an ensemble cv
    built (its members are the fold models, each then used with the ensemble's chosen
    inference)."""
    import json

    from raythyroid import model, storage

    if storage.exists(storage.join(source, "cv.json")):
        summary = json.loads(storage.read_text(storage.join(source, "cv.json")))
        folds = summary["folds"]
        return (summary.get("config", {}).get("seed", 0),
                [model.load(storage.join(source, f"fold-{k}", "model"))
                 for k in range(len(folds))],
                [f.get("val_images") for f in folds])
    if storage.exists(storage.join(source, "fold-0")):
        raise SystemExit(f"{source} is a cv still running: its cv.json is not written yet")
    net, info = model.load(model.resolve(source))
    count = info.training.get("cross_validation", {}).get("folds")
    if not isinstance(net, model.Ensemble) or count != len(net.members):
        raise SystemExit(f"{source} is neither a cv run nor a model cv built")
    held = [f.get("val_images") for f in info.card.get("folds", [])]
    return (info.cv_seed or 0, [(m, info) for m in net.members], held or [None] * count)


def held_out_by_fold(source: str, prepared: str) -> tuple[int, list[tuple]]:
    """(the seed that dealt the folds, [(fold model, its ModelInfo, the rows of PREPARED's
    train and val frames its fold held out)] in fold order), dealt as the models' cv did."""
    from raythyroid import shards, split

    manifest = shards.read_manifest(prepared)
    rows = shards.read_rows(prepared, manifest, ["train", "val"])
    seed, fold_nets, held_counts = every_fold(source)
    case_fold = split.folds((r["case_id"] for r in rows), len(fold_nets), seed)
    found = []
    for fold, (net, info) in enumerate(fold_nets):
        held = [r for r in rows if case_fold[r["case_id"]] == fold]
        if held_counts[fold] not in (None, len(held)):
            raise SystemExit(f"{prepared} deals fold {fold} {len(held)} frames where {source} "
                             f"held out {held_counts[fold]}: not the data the folds were "
                             f"trained on")
        found.append((net, info, held))
    return seed, found
