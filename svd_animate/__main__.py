"""`python -m svd_animate ...` is `svd-animate ...` (what `accelerate launch -m` and torchrun need)."""

import sys

from .cli import main

sys.exit(main())
