"""Sensor drivers: everything that talks to buses and field devices.

A driver knows nothing about WebSockets or CPI. It produces ``Reading`` values through a
publish callback and accepts writes. ``drivers.registry`` maps a bus ``kind`` in the config
to its config class and bus factory, so adding a driver kind touches only this package.
"""
