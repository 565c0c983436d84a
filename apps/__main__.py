"""`python -m apps` runs the `sinkstream` command."""

import sys

from apps.cli import main

sys.exit(main())
