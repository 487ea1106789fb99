"""`python -m experiments.quality`: see experiments/quality/__init__.py."""

import sys

from experiments.quality.run import main

sys.exit(main())
