"""mgllava."""

import os

USER_OMP_NUM_THREADS = os.environ.get("OMP_NUM_THREADS")
"""``OMP_NUM_THREADS`` as this process started. Importing ultralytics sets it to 1 when it is
unset, and training jobs launched from this process must not inherit that
(:func:`mgllava.train.launch.job_env`)."""
