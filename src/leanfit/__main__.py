"""`python -m leanfit <command>` is the `leanfit` console script."""

import sys

from leanfit.train.cli import main

sys.exit(main())
