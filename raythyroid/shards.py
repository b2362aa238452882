"""The prepared-data contract between preprocess and its readers (train, cv, benches):
where the manifest and shards live, and how to read them. preprocess writes it; nothing here
needs Ray."""
from __future__ import annotations

import json

from . import storage
from .errors import UserError

MANIFEST = "manifest.json"
ERRORS = "errors.parquet"


def read_manifest(data: str) -> dict:
    """The manifest of a finished preprocess output; its absence means the output is not done."""
    uri = storage.join(storage.normalize(data), MANIFEST)
    try:
        return json.loads(storage.read_text(uri))
    except FileNotFoundError:
        raise UserError(f"{data} is not a finished preprocess output (no {MANIFEST})") from None
    except OSError as exc:
        raise UserError(f"cannot read {uri}: {storage.describe_error(exc)}") from None


def format_version(manifest: dict) -> int:
    """`raythyroid-preprocess/N` -> N (2 and later: shards carry full_mask)."""
    return int(str(manifest.get("format", "/1")).rsplit("/", 1)[-1])


def shard_uris(data: str, manifest: dict, names) -> list[str]:
    """The shard files of one split or a list of splits, as the manifest vouches for them."""
    names = [names] if isinstance(names, str) else names
    return [storage.join(data, s) for name in names for s in manifest["shards"].get(name) or []]


def read_rows(data: str, manifest: dict, names, columns: list[str] | None = None) -> list[dict]:
    """Every row of the named splits, in shard order (small data: demos, benches, tests)."""
    return [row for uri in shard_uris(data, manifest, names)
            for row in storage.read_parquet(uri, columns).to_pylist()]
