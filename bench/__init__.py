"""Benchmarks of the gateway's hot paths against a named peer, measured in the same run.

Run ``python -m bench`` (all) or ``python -m bench tcp`` / ``python -m bench rtu`` from the
repository root. Each benchmark prints a table; nothing here asserts on speed (tests never do).
May depend on ``drivers``, ``gateway`` and the test peers in ``tests`` (pymodbus's server, ptys).
"""
