"""Ray job entrypoint for `raythyroid train`, configured by a YAML file in jobs/configs/.

    ray job submit --working-dir . -- python jobs/train.py jobs/configs/train.yaml [--set key=value ...]

Inside a Ray job the driver joins the job's cluster; the config's keys are the command's
arguments (see `raythyroid train --help`).
"""
import sys

from raythyroid.jobspec import main
from raythyroid.stopping import leave

if __name__ == "__main__":
    leave(main("train", sys.argv[1:]))
