"""`python -m lmjax.export`: the entry point of `lmjax.hf.export`."""

import sys

from lmjax.hf.export import main

if __name__ == "__main__":
    sys.exit(main())
