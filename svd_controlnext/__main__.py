"""`python -m svd_controlnext ...` is `svd-animate ...` (what `accelerate launch -m` needs)."""

import sys

from cli import main

sys.exit(main())
