"""`python -m bench.cli`: the command line lives in the application layer (bench/app/cli.py)."""
import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
