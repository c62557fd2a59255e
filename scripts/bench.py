#!/usr/bin/env python
"""`python scripts/bench.py ARGS` is `eqr bench ARGS`; the measurements live in eqr/bench/."""
import sys

from eqr.commands import main

if __name__ == "__main__":
    sys.argv[1:1] = ["bench"]
    main()
