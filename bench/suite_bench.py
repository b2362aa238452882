"""Where the test suite's time goes: `make test`'s pytest run under Linux process accounting,
its wall time, the CPU seconds of every process it started (Ray's workers and actors by their
titles, CLI runs by subcommand) and how busy the cores were; with --modes, the suite in two
lanes (pytest-xdist) and in one process, alternating, side by side.

Process accounting (acct(2)) records each process's CPU when it exits, however short it lived;
a sampler names processes by the title Ray gives them while they run. Needs root (or
CAP_SYS_PACCT). Run from the repository root with the tests' environment, e.g.
`CI=true PROMETHEUS_DIR=.cache/prometheus .venv/bin/python bench/suite_bench.py`.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time

from common import record

MODES = {"lanes": ["-n", "2"], "one process": []}
ACCT_V3 = struct.Struct("<BBHIIIIIIf8H16s")  # struct acct_v3, linux/acct.h


def _comp_t(value: int) -> float:
    """acct's comp_t (13-bit mantissa, base-8 exponent) in clock ticks, as seconds."""
    return ((value & 0x1FFF) << (3 * (value >> 13))) / os.sysconf("SC_CLK_TCK")


def read_accounting(path: str) -> list[tuple[int, float, float, float]]:
    """(pid, start, end, user + system CPU seconds) of every process that exited while
    accounting was on. Pids come round again in a suite (each thread takes one too), so a
    process is its pid over its lifetime."""
    ticks = os.sysconf("SC_CLK_TCK")
    data = open(path, "rb").read()
    processes = []
    for offset in range(0, len(data) - ACCT_V3.size + 1, ACCT_V3.size):
        fields = ACCT_V3.unpack_from(data, offset)
        if fields[1] == 3:  # ac_version
            start = float(fields[8])  # ac_btime, whole seconds
            processes.append((fields[6], start, start + fields[9] / ticks,
                              _comp_t(fields[10]) + _comp_t(fields[11])))
    return processes


def kind(title: str) -> str:
    """A process's kind from its last title: Ray's worker titles, CLI subcommands, daemons."""
    if title.startswith("ray::"):
        return title.split()[0].split("(")[0]
    if "raythyroid.cli" in title:
        words = title.split("raythyroid.cli", 1)[1].split()
        return "CLI " + (words[0] if words else "")
    if "exec(eval(sys.stdin" in title:  # execnet's bootstrap: a pytest-xdist lane
        return "pytest lane"
    if "jobs/" in title:
        return "job driver (cluster)"
    for daemon in ("pytest", "gcs_server", "raylet", "dashboard", "log_monitor", "runtime_env",
                   "monitor.py", "Orthanc", "prometheus", "mlflow", "uvicorn", "chrom",
                   "ray start", "default_worker"):
        if daemon in title:
            return daemon
    return "other: " + os.path.basename(title.split()[0]) if title else "unnamed"


class Titles(threading.Thread):
    """Each pid's titles with when they were seen, sampled every `every` seconds while the
    suite runs."""

    def __init__(self, every: float = 0.5):
        super().__init__(daemon=True)
        self.every, self.busy = every, []
        self.titles: dict[int, list[tuple[float, str]]] = collections.defaultdict(list)
        self.stopped = threading.Event()

    def title(self, pid: int, start: float, end: float) -> str:
        """The last title the process with this pid had between its start and its end."""
        seen = [title for when, title in self.titles.get(pid, ())
                if start - 1 <= when <= end + 1]
        return seen[-1] if seen else ""

    def run(self) -> None:
        last = _cpu_ticks()
        while not self.stopped.wait(self.every):
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            title = f.read().replace(b"\0", b" ").decode(errors="replace")
                    except OSError:
                        continue
                    seen = self.titles[int(pid)]
                    if title.strip() and (not seen or seen[-1][1] != title.strip()):
                        seen.append((time.time(), title.strip()))
            now = _cpu_ticks()
            self.busy.append((now[0] - last[0]) / max(now[1] - last[1], 1))
            last = now


def _cpu_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all cores since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def profile(pytest_args: list[str]) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    folder = tempfile.mkdtemp(prefix="suite-acct-")
    path = os.path.join(folder, "pacct")
    open(path, "wb").close()
    if libc.acct(path.encode()) != 0:
        sys.exit(f"process accounting refused ({os.strerror(ctypes.get_errno())}): run as root")
    sampler = Titles()
    sampler.start()
    started = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               *pytest_args], env=dict(os.environ, RAY_ENABLE_AUTO_CONNECT="0"))
    finally:
        wall = time.time() - started
        libc.acct(None)
        sampler.stopped.set()
        sampler.join()
    processes = read_accounting(path)
    by_kind = collections.defaultdict(lambda: [0, 0.0])
    for pid, start, end, seconds in processes:
        entry = by_kind[kind(sampler.title(pid, start, end))]
        entry[0] += 1
        entry[1] += seconds
    busy = sum(sampler.busy) / max(len(sampler.busy), 1)
    return {"wall": wall, "returncode": done.returncode,
            "cpu": sum(p[3] for p in processes), "processes": len(processes), "busy": busy,
            "by_kind": dict(by_kind)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["lanes"])
    parser.add_argument("--top", type=int, default=16, help="process kinds listed")
    parser.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments")
    args = parser.parse_args()
    runs = {mode: profile(MODES[mode] + args.pytest_args) for mode in args.modes}
    lines = ["| | " + " | ".join(runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for label, value in (("tests passed (pytest's exit code 0)",
                          lambda r: "yes" if r["returncode"] == 0 else f"no ({r['returncode']})"),
                         ("wall seconds", lambda r: f"{r['wall']:.0f}"),
                         ("CPU seconds, every process", lambda r: f"{r['cpu']:.0f}"),
                         ("cores busy (mean of 0.5 s samples)", lambda r: f"{r['busy']:.0%}"),
                         ("processes started", lambda r: str(r["processes"]))):
        lines.append(f"| {label} | " + " | ".join(value(r) for r in runs.values()) + " |")
    first = next(iter(runs.values()))
    top = sorted(first["by_kind"].items(), key=lambda item: -item[1][1])[:args.top]
    lines += ["", f"CPU seconds by process kind ({next(iter(runs))}; processes in brackets):",
              "", "| process | " + " | ".join(runs) + " |", "| --- |" + " ---: |" * len(runs)]
    for name, _ in top:
        cells = []
        for run in runs.values():
            count, seconds = run["by_kind"].get(name, (0, 0.0))
            cells.append(f"{seconds:.0f} ({count})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    record("test suite: wall time and where its CPU goes", lines, [
        "each mode one full run of the suite, in the order listed, on a machine running "
        "nothing else; CPU of every process that exited during the run (process "
        "accounting), named by the last title a 0.5 s "
        "sampler saw (Ray's workers retitle themselves as they take tasks and actors: "
        "`ray::IDLE` is a worker between tasks, or one started and never used)"])


if __name__ == "__main__":
    main()
