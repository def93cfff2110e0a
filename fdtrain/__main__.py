"""`python -m fdtrain ...` (what `accelerate launch -m fdtrain train RECIPE` runs)."""
import sys

from fdtrain.cli import main

sys.exit(main())
