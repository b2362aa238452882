"""Ray job entrypoint for the weekly model loop (raythyroid/weekly.py): the corrections
prepared, a fine-tune from the champion registered, and promoted only if it is better.

    ray job submit --working-dir . -- python jobs/loop.py jobs/configs/loop-weekly.yaml [--set key=value ...]
"""
import sys

from raythyroid.stopping import leave
from raythyroid.weekly import main

if __name__ == "__main__":
    leave(main(sys.argv[1:]))
