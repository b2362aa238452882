"""Ray job entrypoint for `raythyroid preprocess`, configured by a YAML file in jobs/configs/.

    ray job submit --working-dir . -- python jobs/preprocess.py jobs/configs/preprocess.yaml [--set key=value ...]

Inside a Ray job the driver joins the job's cluster; the config's keys are the command's
arguments (see `raythyroid preprocess --help`).
"""
import sys

from raythyroid.jobspec import main
from raythyroid.stopping import leave

if __name__ == "__main__":
    leave(main("preprocess", sys.argv[1:]))
