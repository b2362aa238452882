"""The registry's own guarantees; the loop through it (register, promote, infer by alias) is
tested end to end in test_loop.py."""
import pytest

from raythyroid import registry


def test_a_registry_that_does_not_answer_is_never_no_champion(monkeypatch):
    """promote crowns a version as it is only when the model has no champion: a registry down
    (or refusing us) must be an error, not read as none."""
    from helpers import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(registry.UserError, match="cannot read thyroid-nodules@champion"):
        registry.champion("thyroid-nodules")
