"""The model loop as one Ray job, run weekly (jobs/loop.py; k8s/base/raycronjob-loop-weekly.yaml):

    the radiologists' corrections (DICOM images and SEGs exported from the PACS)
      -> preprocess --layout dicom     a person's newest SEG of each frame, split by case
      -> train --init NAME@champion    a fine-tune from the model in use, registered as a
                                       new version of NAME
      -> promote                       the champion moves to it only if compare finds it
                                       better on the corrections' held-out cases

Each step is the command a person would type, with its own checks and exit codes. A candidate
that is not better ends the week's job successfully: the champion stays, and says so.
"""
from __future__ import annotations

import datetime as dt
import sys

from . import jobspec
from .errors import UserError

REQUIRED = ("name", "corrections", "prepared", "runs")
USAGE = "usage: python jobs/loop.py CONFIG.yaml [--set key=value ...]"


def plan(settings: dict, day: str) -> tuple[list[list[str]], str, str]:
    """A config -> (the preprocess and train command lines, the week's RUN, the model's
    name). `preprocess` and `train` sub-mappings add flags to their steps."""
    missing = [key for key in REQUIRED if not settings.get(key)]
    if missing:
        raise UserError(f"loop config lacks {', '.join(missing)}")
    unknown = set(settings) - set(REQUIRED) - {"preprocess", "train", "train_with"}
    if unknown:
        raise UserError(f"loop config has unknown keys: {', '.join(sorted(unknown))}")
    # prepared sets trained on beside the corrections (DDTI, earlier years' corrections): a
    # fine-tune on a week's corrections alone forgets what the champion learnt from them
    also = settings.get("train_with") or []
    also = also if isinstance(also, list) else [also]
    jobspec.refuse_relative_paths({"input": settings["corrections"],
                                   "output": settings["prepared"], "run": settings["runs"],
                                   "data": also})
    name, run = settings["name"], f"{str(settings['runs']).rstrip('/')}/{day}"
    preprocess = jobspec.to_argv("preprocess", {
        "layout": "dicom", **(settings.get("preprocess") or {}),
        "input": settings["corrections"], "output": settings["prepared"]})
    train = jobspec.to_argv("train", {
        **(settings.get("train") or {}), "data": [*also, settings["prepared"]], "run": run,
        "init": f"models:/{name}@champion", "register": name})
    return [preprocess, train], run, name


def main(args: list[str]) -> int:
    from . import cli, registry, storage

    try:
        settings = jobspec.read_config(args, USAGE)
        steps, run, name = plan(settings, dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"))
    except UserError as exc:
        print(f"raythyroid: error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE
    for argv in steps:
        print("raythyroid " + " ".join(argv), flush=True)
        code = cli.main(argv)
        if code:
            return code
    try:
        version = registry.version_of_run(name, storage.normalize(run))
    except UserError as exc:
        print(f"raythyroid: error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE
    promote = ["promote", name, version, str(settings["prepared"])]
    print("raythyroid " + " ".join(promote), flush=True)
    code = cli.main(promote)
    return 0 if code == cli.EXIT_NOT_BETTER else code
