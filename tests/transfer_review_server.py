"""A FastRMCP stdio server on a SQLite store whose tool streams its result slowly, for the
review tests of runs cut short while their result is written
(``python transfer_review_server.py DATABASE``)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
from mcp_types import TextContent

from rmcp_actors.server import FastRMCP, stream_result
from rmcp_actors.stores import SQLiteStore

PIECE = 256 << 10


def _append_pid(marker: str) -> None:
    with Path(marker).open("a") as file:
        file.write(f"{os.getpid()}\n")


def build(database: str) -> FastRMCP:
    app = FastRMCP("review", store=SQLiteStore(database))

    @app.tool()
    async def slow_stream(pieces: int, marker: str) -> TextContent:
        """``pieces`` pieces of 256 KiB, 20 ms apart; once the first is in the store, appends
        this process's pid to the file ``marker``."""

        async def chunks() -> AsyncIterator[bytes]:
            for index in range(pieces):
                yield bytes([97 + index % 26]) * PIECE
                if index == 1:
                    _append_pid(marker)
                await anyio.sleep(0.02)

        return await stream_result(chunks())

    return app


if __name__ == "__main__":
    build(sys.argv[1]).run()
