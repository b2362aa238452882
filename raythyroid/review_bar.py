"""The review queue's bar: the lowest confidences (and IoUs) an infer run has met so far.

Its own light module because the run's one ReviewBar is an actor, and an actor's process
imports its class's module: this one costs a new process no second of imports per run."""
from __future__ import annotations


class ReviewBar:
    """The lowest confidences (and IoUs) this run has met so far, `size` of each, as
    (value, key) pairs: a retried block offers the same frames again and they count once, and
    ties are broken by key as the report's queue breaks them.

    A block keeps an overlay only for a frame at or under the bar: every frame of the final
    queue is kept (no frame below the run's `size`-th lowest can be above the bar of a subset),
    yet an archive of N frames keeps about size x ln(N / size) overlays, not a share of N.
    """

    def __init__(self, size: int):
        self.size = size
        self.lowest: dict[str, dict[str, float]] = {"confidence": {}, "iou": {}}

    def offer(self, values: dict[str, list[tuple[float, str]]]) -> dict[str, tuple | None]:
        """Merge a block's (value, key) pairs; return each bar, None until `size` are known."""
        bars = {}
        for name, found in values.items():
            merged = dict(self.lowest[name], **{key: value for value, key in found})
            kept = sorted((value, key) for key, value in merged.items())[:self.size]
            self.lowest[name] = {key: value for value, key in kept}
            bars[name] = tuple(kept[-1]) if len(kept) >= self.size else None
        return bars
