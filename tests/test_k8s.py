"""The Kubernetes manifests, rendered by kustomize and checked offline: CRD schemas in strict
mode, core kinds with kubernetes-validate --strict, KubeRay's webhook rules, versions, and the
entrypoints and configs the RayJobs name."""
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from functools import lru_cache
from pathlib import Path

import jsonschema
import pytest
import yaml

from raythyroid import cli, jobspec
from raythyroid.errors import UserError

from helpers import ROOT, missing

CRDS = ROOT.parent / "shared" / "k8s-crds"
KUSTOMIZATIONS = ["k8s", "k8s/base", "k8s/monitoring", "k8s/overlays/cpu-dev"]
IMAGE_ROOT = "/home/ray/raythyroid/"  # where cluster/Dockerfile puts the project
RAY_VERSION = re.search(r"ray\[[^\]]*\]==([0-9.]+)",
                        (ROOT / "pyproject.toml").read_text()).group(1)
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@lru_cache(maxsize=None)
def render(path: str) -> list[dict]:
    if not shutil.which("kubectl"):
        missing("kubectl is not installed (needed for `kubectl kustomize`)")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / path)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def strict(schema):
    """What the API server's strict field validation enforces, in plain JSON Schema."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if isinstance(out.get("pattern"), str) and "(?i)" in out["pattern"]:
        out["pattern"] = "(?i)" + out["pattern"].replace("(?i)", "")
    return out


@lru_cache(maxsize=None)
def validators() -> dict:
    if not CRDS.is_dir():
        missing(f"CRDs not found at {CRDS}: the k8s checks read ../shared/k8s-crds")
    found = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            found[(f"{group}/{version['name']}", kind)] = jsonschema.Draft7Validator(schema)
    return found


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_rendered_object_validates_strictly(path, tmp_path):
    docs = render(path)
    assert docs
    core = []
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        if key in validators():
            errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
                      for e in validators()[key].iter_errors(doc)]
            assert not errors, f"{doc['kind']} {doc['metadata']['name']}:\n" + "\n".join(errors)
        else:
            assert "/" not in doc["apiVersion"] or doc["apiVersion"].startswith("apps/"), key
            core.append(doc)
    if core:
        manifest = tmp_path / "core.yaml"
        manifest.write_text(yaml.safe_dump_all(core))
        tool = Path(sys.executable).with_name("kubernetes-validate")
        result = subprocess.run([str(tool), "--strict", "--quiet", str(manifest)],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_strict_schemas_catch_a_misspelled_field():
    validator = validators()[("ray.io/v1", "RayJob")]
    job = next(d for d in render("k8s") if d["kind"] == "RayJob")
    broken = json.loads(json.dumps(job))
    broken["spec"]["shutdownAfterJobFinish"] = True  # missing the final "es"
    assert any("shutdownAfterJobFinish" in e.message for e in validator.iter_errors(broken))


def job_specs(doc) -> list[dict]:
    """The RayJobs a document is or creates: a RayCronJob's template, named after the
    RayCronJob plus a suffix the operator adds (room for 11 characters kept here)."""
    if doc["kind"] == "RayJob":
        return [doc]
    if doc["kind"] == "RayCronJob":
        return [{"metadata": {"name": doc["metadata"]["name"] + "-" + "x" * 10},
                 "spec": doc["spec"]["jobTemplate"]}]
    return []


def cluster_specs(doc) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    return [job["spec"]["rayClusterSpec"] for job in job_specs(doc)
            if "rayClusterSpec" in job["spec"]]


def check_cluster_spec(spec: dict, where: str) -> list[str]:
    """KubeRay's RayCluster webhook and spec validation rules, as its Go code states them."""
    problems = []
    groups = spec.get("workerGroupSpecs", [])
    names = [g["groupName"] for g in groups]
    if len(names) != len(set(names)):
        problems.append(f"{where}: worker group names must be unique")
    for label, group in [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in groups]:
        if not group["template"]["spec"].get("containers"):
            problems.append(f"{where}/{label}: needs at least one container")
        params = group.get("rayStartParams", {})
        if "labels" in params:
            problems.append(f"{where}/{label}: rayStartParams may not set labels")
        if set(params) & {"num-cpus", "num-gpus", "memory", "resources"} and group.get(
                "resources"):
            problems.append(f"{where}/{label}: resources in both rayStartParams and resources")
    for group in groups:
        low, high = group.get("minReplicas"), group.get("maxReplicas")
        if not spec.get("enableInTreeAutoscaling") and (low is None or high is None):
            problems.append(f"{where}/{group['groupName']}: min and max replicas needed")
        if (low or 0) < 0 or (high or 0) < 0 or (low is not None and high is not None
                                                  and low > high):
            problems.append(f"{where}/{group['groupName']}: bad min/max replicas")
        if not (low or 0) <= group.get("replicas", 0) <= (high if high is not None else 1e9):
            problems.append(f"{where}/{group['groupName']}: replicas outside min..max")
        if group.get("suspend") and spec.get("enableInTreeAutoscaling"):
            problems.append(f"{where}/{group['groupName']}: suspended with autoscaling on")
    if spec.get("authOptions", {}).get("mode") == "token":
        version = tuple(int(x) for x in spec.get("rayVersion", "0").split("."))
        if version < (2, 52, 0):
            problems.append(f"{where}: token auth needs rayVersion >= 2.52.0")
    options = spec.get("autoscalerOptions", {})
    if options.get("idleTimeoutSeconds", 0) < 0:
        problems.append(f"{where}: negative autoscaler idleTimeoutSeconds")
    return problems


def check_rayjob(job: dict) -> list[str]:
    """KubeRay's RayJob rules (ValidateRayJobSpec / metadata)."""
    name, spec, problems = job["metadata"]["name"], job["spec"], []
    if len(name) > 47 or not DNS_1035.match(name):
        problems.append(f"{name}: RayJob names are DNS-1035 labels of at most 47 characters")
    if "rayClusterSpec" not in spec and not spec.get("clusterSelector"):
        problems.append(f"{name}: one of rayClusterSpec or clusterSelector must be set")
    if spec.get("clusterSelector"):
        if not spec["clusterSelector"].get("ray.io/cluster"):
            problems.append(f"{name}: clusterSelector needs ray.io/cluster")
        if spec.get("backoffLimit", 0) > 0:
            problems.append(f"{name}: backoffLimit > 0 is incompatible with clusterSelector")
        if spec.get("suspend"):
            problems.append(f"{name}: a clusterSelector job cannot be suspended")
    if spec.get("suspend") and not spec.get("shutdownAfterJobFinishes"):
        problems.append(f"{name}: suspend needs shutdownAfterJobFinishes")
    ttl = spec.get("ttlSecondsAfterFinished", 0)
    if ttl < 0 or (ttl > 0 and not spec.get("shutdownAfterJobFinishes")):
        problems.append(f"{name}: ttlSecondsAfterFinished > 0 needs shutdownAfterJobFinishes")
    if spec.get("backoffLimit", 0) < 0:
        problems.append(f"{name}: negative backoffLimit")
    for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if field in spec and spec[field] <= 0:
            problems.append(f"{name}: {field} must be above 0")
    return problems


@pytest.mark.parametrize("path", ["k8s", "k8s/overlays/cpu-dev"])
def test_kuberay_webhook_rules_hold(path):
    docs = render(path)
    problems = []
    for doc in docs:
        if doc["kind"] == "RayCluster":
            name = doc["metadata"]["name"]
            if len(name) > 53 or not DNS_1035.match(name):
                problems.append(f"{name}: RayCluster names are DNS-1035, at most 53 characters")
        for job in job_specs(doc):
            problems += check_rayjob(job)
        for spec in cluster_specs(doc):
            problems += check_cluster_spec(spec, f"{doc['kind']}/{doc['metadata']['name']}")
    assert not problems, "\n".join(problems)
    clusters = {d["metadata"]["name"] for d in docs if d["kind"] == "RayCluster"}
    for job in (d for d in docs if d["kind"] == "RayJob" and d["spec"].get("clusterSelector")):
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] in clusters


def test_webhook_checks_reject_what_kuberay_rejects():
    job = next(d for d in render("k8s") if d["kind"] == "RayJob" and "rayClusterSpec" in d["spec"])
    bad = json.loads(json.dumps(job))
    bad["spec"]["shutdownAfterJobFinishes"] = False  # a TTL without shutdown is rejected
    assert check_rayjob(bad)
    spec = json.loads(json.dumps(job["spec"]["rayClusterSpec"]))
    spec["workerGroupSpecs"][0]["minReplicas"] = 5
    assert check_cluster_spec(spec, "x")


def test_versions_images_and_ports_match_the_project():
    docs = render("k8s")
    specs = [s for d in docs for s in cluster_specs(d)]
    # the RayCluster, three RayJobs that bring their own cluster, the nightly and the weekly
    # RayCronJobs' jobs
    assert len(specs) == 6
    for spec in specs:
        assert spec["rayVersion"] == RAY_VERSION
        groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
        for group in groups:
            container = group["template"]["spec"]["containers"][0]
            assert f"ray{RAY_VERSION}" in container["image"].rsplit(":", 1)[1]
            assert group["rayStartParams"]["metrics-export-port"] == "8080"
            assert {"name": "metrics", "containerPort": 8080} in container["ports"]
            assert group["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
        gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"][
            "nvidia.com/gpu"] == "1"
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"]["mode"] == "token"
    for spec in (s for d in render("k8s/overlays/cpu-dev") for s in cluster_specs(d)):
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu"]
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={RAY_VERSION}" in dockerfile
    assert "FROM rayproject/ray:${RAY_VERSION}-" in dockerfile
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")


def test_monitoring_objects_match_the_pods_and_files():
    docs = render("k8s")
    monitor = next(d for d in docs if d["kind"] == "PodMonitor")
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= head["metadata"]["labels"].items()
    head_ports = {p["name"] for p in head["spec"]["containers"][0]["ports"]}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= head_ports
    board = next(d for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1")
    shipped = json.loads(next(iter(board["data"].values())))
    assert shipped == json.loads((ROOT / "k8s/monitoring/dashboard.json").read_text())
    rule = next(d for d in docs if d["kind"] == "PrometheusRule")
    assert {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]} == {
        "RaythyroidJobStalled", "RaythyroidErrorRateHigh", "RaythyroidTrainingDiverged"}


def command_lines(command: str, config: Path) -> list[list[str]]:
    """What a job's entrypoint runs for a config: one command, or the weekly loop's steps."""
    from raythyroid import weekly

    if command == "loop":
        return weekly.plan(jobspec.load(str(config)), "2026-01-04")[0]
    return [jobspec.to_argv(command, jobspec.load(str(config)))]


def test_every_entrypoint_names_real_files_and_valid_configs():
    jobs = [job for path in KUSTOMIZATIONS for doc in render(path) for job in job_specs(doc)]
    assert {j["metadata"]["name"] for j in jobs} >= {
        "raythyroid-preprocess", "raythyroid-train", "raythyroid-infer",
        "raythyroid-infer-shared", "raythyroid-infer-nightly-xxxxxxxxxx",
        "raythyroid-loop-weekly-xxxxxxxxxx"}
    parser = cli.build_parser()
    for job in jobs:
        words = shlex.split(job["spec"]["entrypoint"])
        assert words[0] == "python" and words[1].startswith(IMAGE_ROOT)
        script = ROOT / words[1][len(IMAGE_ROOT):]
        config = ROOT / words[2][len(IMAGE_ROOT):]
        assert script.is_file() and config.is_file(), job["spec"]["entrypoint"]
        for argv in command_lines(script.stem, config):
            parsed = parser.parse_args(argv)  # raises on any key the CLI does not know
            assert parsed.command == argv[0]
    for config in (ROOT / "jobs" / "configs").glob("*.yaml"):
        for argv in command_lines(config.stem.split("-")[0], config):
            parser.parse_args(argv)


def test_the_weekly_loop_fine_tunes_the_champion_and_registers_a_dated_run():
    """The loop's steps are the commands a person would type: the corrections through the
    dicom layout's rules, a fine-tune from the champion into this week's RUN, registered."""
    from raythyroid import weekly

    config = jobspec.load(str(ROOT / "jobs" / "configs" / "loop-weekly.yaml"))
    (preprocess, train), run, name = weekly.plan(config, "2026-01-04")
    assert preprocess[:3] == ["preprocess", config["corrections"], config["prepared"]]
    assert "--layout" in preprocess and preprocess[preprocess.index("--layout") + 1] == "dicom"
    assert run == f"{config['runs']}/2026-01-04"
    # beside other prepared sets (DDTI), each split by its own cases
    assert train[:4] == ["train", *config["train_with"], config["prepared"], run]
    assert train[train.index("--init") + 1] == f"models:/{name}@champion"
    assert train[train.index("--register") + 1] == name
    with pytest.raises(UserError, match="lacks prepared"):
        weekly.plan({k: v for k, v in config.items() if k != "prepared"}, "2026-01-04")
    with pytest.raises(UserError, match="relative path"):
        weekly.plan(dict(config, runs="runs/weekly"), "2026-01-04")
    with pytest.raises(UserError, match="relative path"):
        weekly.plan(dict(config, train_with="ddti-prepared"), "2026-01-04")


def test_the_nightly_job_retries_only_a_temporary_failure(tmp_path, capsys):
    """Exit 75 (the PACS unreachable) is tried again in the job; the last code is the job's."""
    from helpers import free_port

    config = tmp_path / "nightly.yaml"
    config.write_text(yaml.safe_dump({
        "model": "model", "output": str(tmp_path / "out"),
        "input": f"dicomweb+http://127.0.0.1:{free_port()}/dicom-web?StudyDate=-1d&PatientID=P1",
        "temporary_failure_retries": 2, "temporary_failure_wait_s": 0}))
    assert jobspec.main("infer", [str(config)]) == cli.EXIT_TEMPORARY_FAILURE
    err = capsys.readouterr()
    assert err.err.count("unreachable") == 3 and "retry 2 of 2" in err.err
    assert "P1" not in err.out + err.err  # the patient filter is echoed as a hash only
    config.write_text(config.read_text().replace("dicomweb+http://127.0.0.1", "dicomweb+http://"))
    assert jobspec.main("infer", [str(config)]) == cli.EXIT_USAGE


def test_pyproject_pins_the_ray_version_the_cluster_uses():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert f"ray[default,train,data]=={RAY_VERSION}" in project["dependencies"]


def test_a_job_refuses_a_relative_local_path(tmp_path, capsys):
    """A Ray job runs in a temporary copy of --working-dir: `output=prepared/` would land in
    it, where nobody looks. The entrypoint says so and exits 2 before Ray starts."""
    config = tmp_path / "preprocess.yaml"
    config.write_text(yaml.safe_dump({"input": "data/", "output": str(tmp_path / "out")}))
    assert jobspec.main("preprocess", [str(config)]) == cli.EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "input='data/' is a relative path" in err, err
    assert "s3://" in err and not (tmp_path / "out").exists()
