"""Flow control: batches (and, with issue 8, limiters, breakers, budgets, hedging)."""
