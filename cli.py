"""`python cli.py ...` from a checkout is `svd-animate ...`. The command lives in `svd_animate/cli.py`;
this file only keeps the specified top-level entry, and is not installed."""

import sys

from svd_animate.cli import main

if __name__ == "__main__":
    sys.exit(main())
