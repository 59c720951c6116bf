"""``python -m rmcp_actors``: the ``rmcp`` command."""

import sys

from rmcp_actors.cli import main

sys.exit(main())
