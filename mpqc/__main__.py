"""``python -m mpqc``: the command line, as the ``mpqc`` script."""
import sys

from mpqc.cli import main

sys.exit(main())
