"""Flow control: admission, rate limits, circuit breakers, retry budgets, hedging and batches.

Each gate here is synchronous state the call path reads in the caller's task; the actors that
own a gate's timers and adaptation run in the server's subtree (see ``root.py``).
"""
