"""`python -m emae COMMAND ...`: the emae command line (what the launcher runs for a stage)."""

import sys

from emae.cli import main

sys.exit(main())
