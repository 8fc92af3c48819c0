"""The gateway's lower layer: what drivers and every component may use.

``reading`` (the ``Reading`` value), ``topics`` (names and MQTT-style patterns),
``configtypes`` (durations, sizes, names, secrets), ``logs`` (one line per event with
``key=value`` context), ``backoff`` (the one retry-delay policy) and ``component`` (the model
every long-running part of the nursery tree follows: health, start policy, statistics).

Modules here import nothing from the rest of ``gateway`` and nothing from ``drivers``; the
import-linter contracts in ``pyproject.toml`` check it in ``make test``.
"""
