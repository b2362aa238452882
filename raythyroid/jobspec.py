"""YAML job configs -> the CLI, for Ray job entrypoints (jobs/*.py) and KubeRay RayJobs.

A config is the command's arguments as data: positional ones by name (train's and cv's `data`
may be a list: several prepared sets), flags by their long name (underscores or dashes).
`--set key=value` overrides a key from the entrypoint line, which is how one config serves
many runs. Everything then goes through the CLI's own parser, so a config can hold nothing the
command line could not, and mistakes end the same way: one line, exit 2.
"""
from __future__ import annotations

import sys

import yaml

from .errors import UserError

# a temporary failure (exit 75: the PACS down for its own night's maintenance) is retried in
# the job itself, a while later, on the cluster it already has; anything else ends the job
RETRY_KEYS = ("temporary_failure_retries", "temporary_failure_wait_s")


POSITIONAL = {"preprocess": ("input", "output"), "train": ("data", "run"),
              "cv": ("data", "run"), "infer": ("model", "input", "output")}
# keys that name data: a job runs in a copy of its working directory on some node, so a local
# one must be absolute (shared storage) or an s3:// / DICOMweb URI
PATH_KEYS = ("input", "output", "data", "run", "model", "labels")


def load(path: str) -> dict:
    from . import storage

    try:
        config = yaml.safe_load(storage.read_text(path)) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"cannot read job config {path}: {storage.describe_error(exc)}") from None
    if not isinstance(config, dict):
        raise UserError(f"job config {path} is not a mapping of keys to values")
    return config


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    config = dict(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes key=value, got {item!r}")
        config[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return config


def to_argv(command: str, config: dict) -> list[str]:
    """A config mapping -> argv for `raythyroid COMMAND ...` (the job's own keys, RETRY_KEYS,
    are not the command's)."""
    config = {k.replace("-", "_"): v for k, v in config.items()}
    config = {k: v for k, v in config.items() if k not in RETRY_KEYS}
    missing = [name for name in POSITIONAL[command] if config.get(name) in (None, "", [])]
    if missing:
        raise UserError(f"{command} config lacks {', '.join(missing)}")
    argv = [command]
    for name in POSITIONAL[command]:  # a list (train's and cv's several `data`) is each item
        value = config.pop(name)
        argv += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    for key, value in sorted(config.items()):
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        else:
            argv += [flag, str(value)]
    return argv


def main(command: str, args: list[str]) -> int:
    """`python jobs/<command>.py CONFIG [--set key=value ...]`."""
    from . import cli

    try:
        settings = read_config(
            args, f"usage: python jobs/{command}.py CONFIG.yaml [--set key=value ...]")
        refuse_relative_paths(settings)
        retries = _retries(settings)
        argv = to_argv(command, settings)
    except UserError as exc:
        print(f"raythyroid: error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE
    from .dicomweb import safe_uri

    print("raythyroid " + " ".join(safe_uri(word) for word in argv), flush=True)
    return _run_retrying(argv, *retries)


def read_config(args: list[str], usage: str) -> dict:
    """`CONFIG.yaml [--set key=value ...]` -> the config's settings, overrides applied."""
    if not args or args[0].startswith("-"):
        raise UserError(usage)
    config, overrides = args[0], []
    rest = args[1:]
    while rest:
        if rest[0] != "--set" or len(rest) < 2:
            raise UserError(f"unexpected argument {rest[0]!r}: only --set key=value")
        overrides.append(rest[1])
        rest = rest[2:]
    return apply_overrides(load(config), overrides)


def refuse_relative_paths(settings: dict) -> None:
    for key in PATH_KEYS:
        values = settings.get(key)
        for value in values if isinstance(values, list) else [values]:
            _refuse_relative_path(key, value)


def _refuse_relative_path(key: str, value) -> None:
    import os

    if key == "model" and isinstance(value, str) and "/" not in value:
        return  # the name of a model shipped in the package, not a path
    if isinstance(value, str) and value and "://" not in value and not os.path.isabs(value):
        raise UserError(
            f"{key}={value!r} is a relative path: a Ray job runs in a temporary copy of "
            f"--working-dir, so give an absolute path on storage every node shares, or an "
            f"s3:// URI")


def _retries(settings: dict) -> tuple[int, float]:
    try:
        attempts = int(settings.get(RETRY_KEYS[0], 0) or 0)
        wait_s = float(settings.get(RETRY_KEYS[1], 600) or 0)
    except (TypeError, ValueError):
        raise UserError(f"{RETRY_KEYS[0]} and {RETRY_KEYS[1]} take numbers") from None
    if attempts < 0 or wait_s < 0:
        raise UserError(f"{RETRY_KEYS[0]} and {RETRY_KEYS[1]} cannot be negative")
    return attempts, wait_s


def _run_retrying(argv: list[str], retries: int, wait_s: float) -> int:
    import time

    from . import cli, stopping

    with stopping.handled():
        for attempt in range(retries + 1):
            code = cli.main(argv)
            if code != cli.EXIT_TEMPORARY_FAILURE or attempt == retries:
                return code
            print(f"raythyroid: temporary failure; retry {attempt + 1} of {retries} in "
                  f"{wait_s:g} s", file=sys.stderr, flush=True)
            try:
                time.sleep(wait_s)
            except KeyboardInterrupt:  # stopped while waiting for the server to come back
                print(f"raythyroid: {argv[0]} stopped while waiting to retry",
                      file=sys.stderr, flush=True)
                return stopping.exit_code()
    return code

