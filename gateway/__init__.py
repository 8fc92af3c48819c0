"""edge-gateway: the daemon (composition root, hub, supervisor, systemd glue, config).

Sensor drivers live in the sibling package ``drivers``; this package composes them.
"""

__version__ = "0.1.0"
