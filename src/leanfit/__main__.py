"""`python -m leanfit <command>` is the `leanfit` console script."""

import sys

from leanfit.train.commands import main

sys.exit(main())
