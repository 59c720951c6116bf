"""Backoff arithmetic shared by call retries and reconnects."""

from __future__ import annotations

import random

__all__ = ["backoff_delay"]


def backoff_delay(attempt: int, base_delay_s: float, max_delay_s: float, rng: random.Random) -> float:
    """Return the sleep before retry number ``attempt`` (1-based): exponential with full jitter.

    Full jitter (uniform between zero and the capped exponential) spreads the retries of many
    callers that failed together, instead of having them all come back at once.

    Args:
        attempt: How many failures came before this sleep (1 for the first retry).
        base_delay_s: The cap of the first sleep.
        max_delay_s: The cap of every sleep.
        rng: The source of jitter (seedable in tests).

    Returns:
        Seconds to sleep, in ``[0, min(max_delay_s, base_delay_s * 2 ** (attempt - 1))]``.
    """
    exponent = min(attempt - 1, 62)
    cap = min(max_delay_s, base_delay_s * (2.0**exponent))
    return rng.uniform(0.0, cap)
