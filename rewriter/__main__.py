"""`python -m rewriter`: the command line (rewriter/cli.py)."""

import sys

from rewriter.cli import main

sys.exit(main())
