"""``transfer_server.py`` with one more tool, ``wide``: a text result that is not ASCII, for the
memory bound of a reassembled result (run as a stdio subprocess: ``python wide_transfer_server.py``).
"""

from __future__ import annotations

import random

from transfer_server import build_transfer_server, payload

__all__ = ["wide_payload"]


def wide_payload(size: int) -> str:
    """``size`` bytes of UTF-8: the first half ASCII (:func:`payload`), the rest CJK (three bytes
    each, so chunk boundaries cut characters), then ASCII to the exact size. The string widens to
    two bytes a character in the middle: reassembled, it is copied once there."""
    half = payload(size // 2)
    rng = random.Random(7)
    cjk = "".join(chr(0x4E00 + rng.randrange(20_000)) for _ in range((size - size // 2) // 3))
    return half + cjk + payload((size - size // 2) % 3, 1)


def main() -> None:
    app = build_transfer_server()

    @app.tool(structured_output=False)
    async def wide(size: int) -> str:  # pyright: ignore[reportUnusedFunction]
        """:func:`wide_payload` of ``size`` bytes."""
        return wide_payload(size)

    app.run()


if __name__ == "__main__":
    main()
