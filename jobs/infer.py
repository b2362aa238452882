"""Ray job entrypoint for `raythyroid infer`, configured by a YAML file in jobs/configs/.

    ray job submit --working-dir . -- python jobs/infer.py jobs/configs/infer.yaml [--set key=value ...]

Inside a Ray job the driver joins the job's cluster; the config's keys are the command's
arguments (see `raythyroid infer --help`).
"""
import sys

from raythyroid.jobspec import main
from raythyroid.stopping import leave

if __name__ == "__main__":
    leave(main("infer", sys.argv[1:]))
