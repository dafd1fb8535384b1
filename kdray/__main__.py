"""``python -m kdray``: the same as the ``kdray`` command."""
import sys

from kdray.cli import main

sys.exit(main())
