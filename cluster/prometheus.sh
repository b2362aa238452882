#!/usr/bin/env bash
# Start a local Prometheus (Debian's binary, fetched on first use) with the raythyroid alert
# rules, scraping the local Ray cluster and job drivers per cluster/prometheus.yml.
# UI and API on http://127.0.0.1:9090. Ctrl-C stops it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="$root/.cache/prometheus"
"$root/cluster/fetch-prometheus.sh" "$cache"
python3 - "$root/k8s/monitoring/prometheusrule.yaml" "$cache/rules.yml" <<'PY'
import sys, yaml
rule = yaml.safe_load(open(sys.argv[1]))
yaml.safe_dump({"groups": rule["spec"]["groups"]}, open(sys.argv[2], "w"), sort_keys=False)
PY
mkdir -p "$cache/data"
exec "$cache/usr/bin/prometheus" --config.file="$root/cluster/prometheus.yml" \
  --storage.tsdb.path="$cache/data" --web.listen-address=127.0.0.1:9090 "$@"
