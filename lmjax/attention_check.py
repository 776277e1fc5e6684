"""`python -m lmjax.attention_check`: the entry point of `lmjax.attention.check`."""

import sys

from lmjax.attention.check import main

if __name__ == "__main__":
    sys.exit(main())
