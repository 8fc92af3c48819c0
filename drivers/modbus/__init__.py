"""Modbus RTU and Modbus TCP buses.

``config`` (what the user writes), ``datatypes`` (registers <-> values, pure), ``planner``
(points -> as few read requests as possible, pure), ``codec`` (the one module that touches
pymodbus: frames and PDUs, sans-IO), ``link`` (one line: reconnects, one transaction at a
time, its condition), ``bus`` (per-device schedules and backoff, readings, writes, the bus's
condition and statistics), ``tcp`` and ``rtu`` (the Trio transports).
"""
