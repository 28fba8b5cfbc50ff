"""`python -m er_jax.cli ...`: the same as the `er-jax` console script."""
import sys

from er_jax.cli import main

sys.exit(main())
