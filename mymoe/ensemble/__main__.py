"""python -m mymoe.ensemble build | train-gate | evaluate | generate (see mymoe/ensemble/__init__.py)."""

import sys

from mymoe.ensemble.cli import parse_args

ARGUMENTS = parse_args()  # --help and a bad flag answer here, before the import below loads torch (seconds)

from mymoe.ensemble.commands import run  # noqa: E402

sys.exit(run(ARGUMENTS))
