"""Modbus RTU and Modbus TCP buses.

``config`` (what the user writes), ``datatypes`` (registers <-> values, pure), ``planner``
(points -> as few read requests as possible, pure), ``codec`` (the one module that touches
pymodbus: frames and PDUs, sans-IO), ``poller`` (per-device schedule, readings, writes),
``tcp`` and ``rtu`` (the Trio transports).
"""
