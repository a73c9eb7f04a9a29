"""``python -m backend.service serve|keys|client ...`` (the same commands as ``python -m backend``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
