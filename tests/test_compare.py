"""`raythyroid compare`: two models scored on the same labelled frames in one Ray job, and a
gate that opens only when the candidate is better beyond the bootstrap interval."""
import json

import numpy as np
import pytest

from raythyroid import cli, compare, model, storage


def untrained_model(trained: str, folder: str) -> str:
    """A model that segments badly: the trained one's architecture and settings, random
    weights."""
    import torch

    net, info = model.load(trained)
    torch.manual_seed(3)
    model.save(model.build(net.config), folder, {"prep": info.prep.to_dict(),
                                                 **info.inference.to_json()})
    return folder


@pytest.mark.timeout(600)
def test_compare_opens_the_gate_only_for_a_better_candidate(phantom_dataset, trained_run,
                                                             tmp_path):
    _, prepared = phantom_dataset
    run_uri, _ = trained_run
    trained = storage.join(run_uri, "model")
    worse = untrained_model(trained, str(tmp_path / "worse"))

    better = compare.run(worse, trained, prepared, log=lambda *_: None)
    assert better.b_is_better and better.interval[0] > 0
    assert better.b.n_iou > better.a.n_iou and better.frames >= 10
    # the same frames, the other way round: the untrained candidate is refused
    assert not compare.run(trained, worse, prepared, log=lambda *_: None).b_is_better
    # the CLI's exit code is the gate: 0 only when B is better; a script reads the JSON
    out = tmp_path / "comparison.json"
    assert cli.main(["compare", worse, trained, prepared, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["b_is_better"] is True
    assert cli.main(["compare", trained, trained, prepared]) == cli.EXIT_NOT_BETTER


def test_the_interval_resamples_cases_not_frames():
    """Ten cases, one of which holds most frames and all of B's gain: resampling frames would
    call B better, resampling cases (a patient's frames agree with each other) does not."""
    rows = []
    for case in range(10):
        frames = 30 if case == 0 else 1
        for _ in range(frames):
            a = {"tp": 50, "fp": 50, "fn": 0, "tn": 900}
            b = {"tp": 100, "fp": 0, "fn": 0, "tn": 900} if case == 0 else \
                {"tp": 45, "fp": 55, "fn": 0, "tn": 900}
            rows.append({"case_id": f"p-{case}", **{f"a_{k}": v for k, v in a.items()},
                         **{f"b_{k}": v for k, v in b.items()}})
    judged = compare.judge(rows, "a", "b", resamples=2000)
    assert judged.difference > 0 and judged.cases == 10
    assert judged.interval[0] < 0 < judged.interval[1] and not judged.b_is_better
    # the same frames, each its own case: the frame-level interval excludes zero
    alone = [dict(r, case_id=f"f-{i}") for i, r in enumerate(rows)]
    assert compare.judge(alone, "a", "b", resamples=2000).b_is_better
    assert np.isclose(judged.difference, compare.judge(alone, "a", "b").difference)
