"""The application with every subcommand registered: each module below adds its own to ``app``.

A new subcommand is a module of this package plus one import line here.
"""

from __future__ import annotations

from . import batch as batch
from . import bench as bench
from . import call as call
from . import chaos as chaos
from . import check as check
from . import servers as servers
from ._app import app

__all__ = ["app"]
