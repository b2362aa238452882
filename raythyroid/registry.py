"""Model versions in MLflow's Model Registry, the registry teams already run (optional:
`pip install raythyroid[mlflow]`). MLFLOW_TRACKING_URI names it: a server, or a local store.

    train / cv (MLFLOW_TRACKING_URI set)  -> an MLflow run: parameters, per-epoch metrics, the
                                             model folder as its artifacts; with --register
                                             NAME, a new version of NAME
    models:/NAME@ALIAS, models:/NAME/N    -> a model folder any room loads (model.resolve),
                                             downloaded once per version
    promote                               -> the `champion` alias moved to a better version

A version's artifacts are the model folder exactly as `model.save` writes it: nothing is
wrapped, so a downloaded version is what train wrote.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile

from . import storage
from .errors import UserError

CHAMPION = "champion"
EXPERIMENT = "raythyroid"
PREFIX = "models:/"
MODEL_PATH = "model"  # the model folder under a run's artifacts
_REFERENCE = re.compile(r"models:/([^/@]+)(?:@([^/@]+)|/(\d+))$")


def is_registry_uri(uri: str) -> bool:
    return uri.startswith(PREFIX)


def enabled() -> bool:
    """Whether train and cv log their runs: MLFLOW_TRACKING_URI is set."""
    return bool(os.environ.get("MLFLOW_TRACKING_URI"))


def _mlflow():
    try:
        import mlflow
    except ImportError:
        raise UserError("MLflow is not installed: pip install 'raythyroid[mlflow]'") from None
    # a job's log says what raythyroid did; MLflow's own INFO lines and bars stay out of it
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return mlflow


def parse(uri: str) -> tuple[str, str | None, str | None]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (name, alias, version)."""
    found = _REFERENCE.match(uri)
    if not found:
        raise UserError(f"{uri}: a registry model is models:/NAME@ALIAS or models:/NAME/VERSION")
    return found.group(1), found.group(2), found.group(3)


def pin(uri: str) -> str:
    """models:/NAME@ALIAS -> models:/NAME/VERSION, the version the alias names now: a job's
    every node then loads the same weights even if the alias moves meanwhile."""
    name, alias, version = parse(uri)
    if version:
        return uri
    client = _mlflow().MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias).version
    except Exception as exc:
        raise UserError(f"{uri}: the registry at {_tracking()} has no {name}@{alias} "
                        f"({_reason(exc)})") from None
    return f"{PREFIX}{name}/{version}"


def fetch(uri: str) -> str:
    """A registry model as a local model folder, downloaded once per version (a cache under
    the temp folder, shared by the runs on this node, kept apart by registry). Ray workers find
    the registry as the driver does: MLFLOW_TRACKING_URI, which a local Ray's workers inherit
    and a cluster's are given (runtime.STORAGE_VARIABLES)."""
    name, _, version = parse(pin(uri))
    registry_id = hashlib.sha256(_tracking().encode()).hexdigest()[:12]
    folder = os.path.join(tempfile.gettempdir(), "raythyroid-registry", registry_id, name,
                          version)
    if not os.path.exists(os.path.join(folder, "model.json")):
        mlflow = _mlflow()
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        partial = tempfile.mkdtemp(prefix=f".{version}-", dir=os.path.dirname(folder))
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=f"{PREFIX}{name}/{version}",
                                                dst_path=partial)
        except Exception as exc:
            shutil.rmtree(partial, ignore_errors=True)
            raise UserError(f"cannot download {PREFIX}{name}/{version} from {_tracking()}: "
                            f"{_reason(exc)}") from None
        # renamed into place whole: a reader never sees half a download
        if not os.path.exists(folder):
            os.replace(partial, folder)
        else:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def log_run(job: str, run_uri: str, params: dict, history: list[dict],
            register_as: str | None = None, model_folder: str | None = None) -> str | None:
    """A finished train or cv run into MLflow: its flags, its epochs' metrics (step = epoch)
    and its model folder (RUN/model unless named) as artifacts; with `register_as`, a new
    version of that registered model. Returns the version, or None."""
    mlflow = _mlflow()
    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
    with tempfile.TemporaryDirectory() as local:
        model_folder = model_folder or storage.join(run_uri, MODEL_PATH)
        for uri in storage.list_files(model_folder):
            target = os.path.join(local, storage.relative(uri, model_folder))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(storage.read_bytes(uri))
        with mlflow.start_run(run_name=f"{job} {storage.basename(run_uri)}") as run:
            mlflow.log_params({k: json.dumps(v) if isinstance(v, (dict, list)) else v
                               for k, v in params.items()})
            mlflow.set_tags({"raythyroid.job": job, "raythyroid.run": run_uri})
            for row in history:
                figures = {k: float(v) for k, v in row.items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)
                           and k != "epoch"}
                mlflow.log_metrics(figures, step=int(row["epoch"]))
            mlflow.log_artifacts(local, artifact_path=MODEL_PATH)
            source = f"{run.info.artifact_uri}/{MODEL_PATH}"
            run_id = run.info.run_id
    return _new_version(register_as, source, run_id) if register_as else None


def log_finished(job: str, run_uri: str, params: dict, history: list[dict],
                 register: str | None, log) -> None:
    """log_run at the end of a train or cv run. Asked to register, a failure is the run's; only
    logging (MLFLOW_TRACKING_URI set), it is one line: the model is in RUN whatever MLflow
    says."""
    try:
        version = log_run(job, run_uri, params, history, register)
    except Exception as exc:
        if register:
            raise UserError(f"{job}: the model in {storage.join(run_uri, MODEL_PATH)} was not "
                            f"registered in MLflow at {_tracking()} ({_reason(exc)}): "
                            f"raythyroid register {storage.join(run_uri, MODEL_PATH)} "
                            f"{register}") from None
        log(f"{job}: not logged to MLflow at {_tracking()}: {_reason(exc)}")
        return
    log(f"{job}: logged to MLflow at {_tracking()}"
        + (f" as {register} version {version}" if version else ""))


def register_folder(folder: str, name: str) -> str:
    """An existing model folder (a bundled model, one trained elsewhere) as a new version."""
    folder = storage.normalize(folder)
    return log_run("register", folder, {"model": folder}, [], register_as=name,
                   model_folder=folder)


def _new_version(name: str, source: str, run_id: str) -> str:
    """A version of `name` whose artifacts are `source` (the model folder as written, not an
    MLflow-flavoured model: MLflow's register_model wants one of those)."""
    client = _mlflow().MlflowClient()
    try:
        client.get_registered_model(name)
    except Exception as exc:
        if not _not_found(exc):
            raise
        client.create_registered_model(name)
    return str(client.create_model_version(name, source=source, run_id=run_id).version)


def version_of_run(name: str, run_uri: str) -> str:
    """The version of `name` that the training run at RUN registered (the newest, should a
    rerun have registered it again)."""
    client = _mlflow().MlflowClient()
    versions = sorted(client.search_model_versions(f"name='{name}'"),
                      key=lambda v: int(v.version), reverse=True)
    for version in versions:
        if version.run_id and client.get_run(version.run_id).data.tags.get(
                "raythyroid.run") == run_uri:
            return str(version.version)
    raise UserError(f"no version of {name} in {_tracking()} was registered by {run_uri}")


def champion(name: str, alias: str = CHAMPION) -> str | None:
    """The version `alias` names now, or None when it names none yet. Any other answer (the
    registry down, credentials refused) is an error, never "no champion": promote would
    otherwise crown a candidate without comparing it."""
    try:
        return str(_mlflow().MlflowClient().get_model_version_by_alias(name, alias).version)
    except Exception as exc:
        if _not_found(exc):
            return None
        raise UserError(f"cannot read {name}@{alias} from {_tracking()}: "
                        f"{_reason(exc)}") from None


def _not_found(exc: Exception) -> bool:
    """MLflow's answer for a model or alias that does not exist (not for a failure)."""
    return getattr(exc, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST",
                                                "INVALID_PARAMETER_VALUE")


def crown(name: str, version: str, alias: str = CHAMPION) -> None:
    _mlflow().MlflowClient().set_registered_model_alias(name, alias, version)


def _tracking() -> str:
    """The tracking URI without credentials (a URI may carry user:password@)."""
    return re.sub(r"//[^/@]*@", "//", os.environ.get("MLFLOW_TRACKING_URI") or "a local store")


def _reason(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
