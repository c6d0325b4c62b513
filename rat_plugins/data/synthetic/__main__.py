"""Entry point of ``python -m rat_plugins.data.synthetic`` (see ``cli``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
