"""`python -m svd_controlnext ...` is `svd-animate ...`, kept for the `accelerate launch -m svd_controlnext`
commands users already have. The one place the library reaches up into the application."""

import sys

from svd_animate.cli import main

sys.exit(main())
