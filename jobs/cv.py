"""Ray job entrypoint for `raythyroid cv`, configured by a YAML file in jobs/configs/.

    ray job submit --working-dir . -- python jobs/cv.py jobs/configs/cv.yaml [--set key=value ...]

Inside a Ray job the driver joins the job's cluster; the config's keys are the command's
arguments (see `raythyroid cv --help`).
"""
import sys

from raythyroid.jobspec import main
from raythyroid.stopping import leave

if __name__ == "__main__":
    leave(main("cv", sys.argv[1:]))
