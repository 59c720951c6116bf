"""``python -m rmcp_actors``: the ``rmcp`` command."""

import sys

from rmcp_actors.cli import main

# Guarded: importing every module of the package (tests/test_errors_pickle.py does) must not
# run the command and exit.
if __name__ == "__main__":
    sys.exit(main())
