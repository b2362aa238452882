"""Shared bits of the benchmarks: machine description, data set-up, and BENCHMARKS.md."""
from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import statistics
import sys
import tempfile
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
