"""A chaos MCP server: tools that fail, hang, are slow, rate-limit, return large payloads,
count their side effects in a ledger, and report peak concurrency.

Usage::

    python -m rmcp_actors.testing.chaos_server [--ledger PATH] [--store PATH | --plain]
        [--rate N] [--http HOST:PORT]

By default the server speaks RMCP (the server side of :func:`rmcp_actors.server.install`) with
an in-memory idempotency store; ``--store PATH`` keeps the records in a ``SQLiteStore`` that
survives the server's restarts, so a keyed call retried after a crash is replayed, not run
again; ``--plain`` serves plain MCP. It serves stdio unless ``--http`` asks for Streamable HTTP
(at ``http://HOST:PORT/mcp``).

The tools:

- ``effect(label)``: a side effect that must not run twice. Each run adds one row to the
  ledger, a SQLite file (``--ledger``, default ``chaos-ledger.sqlite``) that survives restarts
  and is shared safely by several server processes; :class:`Ledger` reads it back.
- ``ledger(label=None)``: the ledger's counts per label (one label, or all).
- ``fail(how, message)``: fails: ``"tool_error"`` answers an error result (``isError``),
  ``"exception"`` raises an unexpected exception (an error result too, with a generic text),
  ``"protocol_error"`` answers a JSON-RPC error.
- ``hang()``: never answers; ends only when cancelled (under RMCP a keyed run is shielded from
  the client's cancel, up to the middleware's ``max_execution_s``).
- ``slow(seconds, label=None)``: answers after ``seconds`` (and records ``label`` if given).
- ``limited(text)``: answers ``text``, unless called more than ``--rate`` times per second
  (token bucket, burst of one second): then the JSON-RPC error ``-32023`` (SEP-3304) with
  ``retryAfterMs``, the rate-limit signal rmcp_actors slows down for. The refusal comes before
  the RMCP middleware, as a gateway's would: a refused call never claims its key.
- ``large(size)``: a text of exactly ``size`` characters (at most 64 MiB).
- ``peak_concurrency(reset=False)``: the most tool runs this process had at once (every tool
  above but ``ledger``), and how many run now.
"""

# The implementation lives in a private module: ``rmcp_actors.testing`` exports it from there,
# so that running this module as ``__main__`` does not find it imported already.
from ._chaos_server import DEFAULT_LEDGER as DEFAULT_LEDGER
from ._chaos_server import DEFAULT_RATE_PER_S as DEFAULT_RATE_PER_S
from ._chaos_server import MAX_LARGE_SIZE as MAX_LARGE_SIZE
from ._chaos_server import Ledger as Ledger
from ._chaos_server import build_chaos_server as build_chaos_server
from ._chaos_server import main as main

__all__ = ["DEFAULT_LEDGER", "DEFAULT_RATE_PER_S", "MAX_LARGE_SIZE", "Ledger", "build_chaos_server", "main"]

if __name__ == "__main__":
    main()
