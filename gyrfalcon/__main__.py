"""`python -m gyrfalcon`: the same command line as the installed `gyrfalcon` script (see cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
