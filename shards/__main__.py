"""`python -m shards` is the same as the `tricolor-shards` console script."""

import sys

from shards.cli import main

sys.exit(main())
