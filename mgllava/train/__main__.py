"""``python -m mgllava.train``: one training stage; what the ``deepspeed`` launcher runs on each rank."""

import sys

from mgllava.train.cli import main

sys.exit(main())
