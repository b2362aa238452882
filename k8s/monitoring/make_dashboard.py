"""Writes dashboard.json: the Grafana dashboard for raythyroid jobs.

Kept as code so every panel is uniform (datasource variable, unit, the job kinds it needs) and
the JSON is regenerated, not hand-edited: `python k8s/monitoring/make_dashboard.py`.
Each panel's description ends with `[jobs: ...]` (and `[needs: gpu]`), which the monitoring test
reads to know which panels must show data after a CPU run of those jobs.
"""
import json
from pathlib import Path

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"

PANELS = [
    # title, unit, jobs, needs, [(legend, expr)], kind
    ("Images per second by job", "suffix:img/s", ["preprocess", "infer"], None,
     [("{{pipeline}} prepared",
       f"sum by (pipeline) (rate(ray_raythyroid_images_prepared_total[{RATE}]))"),
      ("{{pipeline}} predicted",
       f"sum by (pipeline) (rate(ray_raythyroid_images_predicted_total[{RATE}]))")],
     "timeseries"),
    # training counts optimizer steps, the other jobs inputs
    ("Done vs total", "short", ["preprocess", "train", "infer"], None,
     [("{{pipeline}} {{run}} done", "raythyroid_job_done_inputs"),
      ("{{pipeline}} {{run}} total", "raythyroid_job_total_inputs")], "timeseries"),
    ("ETA", "s", ["preprocess", "train", "infer"], None,
     [("{{pipeline}} {{run}}", "raythyroid_job_eta_seconds")], "stat"),
    ("Job state", "short", ["preprocess", "train", "infer"], None,
     [("{{pipeline}} {{run}} {{state}}", "raythyroid_job_state == 1")], "stat"),
    ("Errors by reason", "short", ["preprocess", "infer"], None,
     [("{{pipeline}} {{stage}} {{reason}}",
       "sum by (pipeline, stage, reason) (ray_raythyroid_images_failed_total)")], "timeseries"),
    ("Error rate", "percentunit", ["preprocess", "infer"], None,
     [("{{pipeline}}",
       f"sum by (pipeline) (rate(ray_raythyroid_images_failed_total[{RATE}])) / "
       f"(sum by (pipeline) (rate(ray_raythyroid_images_prepared_total[{RATE}])) + "
       f"sum by (pipeline) (rate(ray_raythyroid_images_failed_total[{RATE}])))")], "timeseries"),
    ("Batch latency p50 / p95", "s", ["preprocess", "infer"], None,
     [(f"{{{{stage}}}} p{q}",
       f"histogram_quantile({q / 100}, sum by (le, stage) "
       f"(rate(ray_raythyroid_batch_latency_seconds_bucket[{RATE}])))") for q in (50, 95)],
     "timeseries"),
    ("Bytes read per second", "Bps", ["preprocess", "infer"], None,
     [("{{pipeline}}", f"sum by (pipeline) (rate(ray_raythyroid_bytes_read_total[{RATE}]))")],
     "timeseries"),
    ("GPU utilisation", "percent", ["train", "infer"], "gpu",
     [("{{instance}} GPU {{GpuIndex}}", "ray_node_gpus_utilization")], "timeseries"),
    ("Object store memory", "bytes", ["preprocess", "train", "infer"], None,
     [("used", "sum(ray_object_store_memory)")], "timeseries"),
    ("Training: epoch and ETA", "short", ["train"], None,
     [("{{run}} epoch", "max by (run) (ray_raythyroid_train_epoch)"),
      ("{{run}} ETA (s)", 'raythyroid_job_eta_seconds{pipeline=~"train|cv"}')], "stat"),
    ("Training loss", "none", ["train"], None,
     [("{{run}}", "ray_raythyroid_train_loss")], "timeseries"),
    ("Validation n_IoU", "percentunit", ["train"], None,
     [("{{run}}", "ray_raythyroid_val_n_iou")], "timeseries"),
    ("Training images per second", "suffix:img/s", ["train"], None,
     [("{{run}}", "ray_raythyroid_train_images_per_second")], "timeseries"),
    ("Ray Data blocked time", "s", ["train", "infer"], None,
     [("{{dataset}}", "sum by (dataset) (ray_data_iter_total_blocked_seconds)")], "timeseries"),
]


def panel(index, title, unit, jobs, needs, targets, kind):
    description = f"[jobs: {', '.join(jobs)}]" + (f" [needs: {needs}]" if needs else "")
    return {
        "id": index + 1,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [{"refId": chr(65 + i), "datasource": DATASOURCE, "expr": expr,
                     "legendFormat": legend} for i, (legend, expr) in enumerate(targets)],
    }


def dashboard():
    return {
        "title": "raythyroid jobs",
        "uid": "raythyroid-jobs",
        "tags": ["raythyroid", "ray"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "label": "Prometheus", "type": "datasource",
                                 "query": "prometheus", "current": {}, "hide": 0}]},
        "panels": [panel(i, *spec) for i, spec in enumerate(PANELS)],
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("dashboard.json")
    out.write_text(json.dumps(dashboard(), indent=2) + "\n")
    print(f"wrote {out}")
