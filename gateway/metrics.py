"""``GET /metrics``: the gateway's statistics in the Prometheus text exposition format.

``render`` turns one ``GatewayStatistics`` snapshot (and the command router's counts) into
the exposition text through prometheus-client: a custom collector over a private registry,
so nothing is kept between scrapes and nothing is global. Every series is prefixed
``edge_gateway_``; labels name the component, bus, device, HTTP status or state.

Bus statistics differ per driver; they are read generically by attribute name (a Modbus
bus's ``devices`` mapping of per-device counters, or bus-level counters such as ``polls``),
so this module never imports ``drivers``. A counter a driver does not keep is left out.

Depends on prometheus-client, attrs, ``gateway.core``, and the statistics value classes of
the supervisor, hub, device plane, outbox, forwarder and command router.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gateway.commands import CommandStatistics
from gateway.core.component import State
from gateway.deviceplane import DevicePlaneStatistics
from gateway.forwarder import ForwarderStatistics
from gateway.outbox import OutboxStatistics
from gateway.supervisor import GatewayStatistics, SupervisedStatistics

PREFIX = "edge_gateway_"

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
"""What ``render`` produces. The 0.0.4 text format, which every Prometheus since 2.0 (and
every other scraper) reads; with names like ours it is byte for byte what 1.0.0 would be."""


# Per-device (Modbus ``devices``) or per-bus counters, by attribute name: (series, help).
_BUS_COUNTERS = (
    ("polls", "bus_polls", "Poll cycles."),
    ("timeouts", "bus_timeouts", "Requests that got no answer in time."),
    ("crc_errors", "bus_crc_errors", "Answers with a bad checksum (or a malformed frame)."),
    ("writes", "bus_writes", "Writes attempted."),
    ("write_errors", "bus_write_errors", "Writes that failed."),
)


def render(stats: GatewayStatistics, commands: CommandStatistics | None = None) -> bytes:
    """The exposition text of one snapshot (``CONTENT_TYPE``)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats, commands))
    return generate_latest(registry)


class _Snapshot:
    """A prometheus-client collector over one snapshot (registered once, collected once)."""

    def __init__(self, stats: GatewayStatistics, commands: CommandStatistics | None) -> None:
        self.stats = stats
        self.commands = commands

    def collect(self) -> Iterator[Metric]:
        yield from _hub(self.stats)
        yield from _components(self.stats.components)
        yield from _buses([c for c in self.stats.components if c.kind == "bus"])
        yield from _device_planes(
            [c.part for c in self.stats.components if isinstance(c.part, DevicePlaneStatistics)]
        )
        yield from _outbox(
            [c.part for c in self.stats.components if isinstance(c.part, OutboxStatistics)]
        )
        yield from _cpi(
            [c.part for c in self.stats.components if isinstance(c.part, ForwarderStatistics)]
        )
        yield from _api([c.part for c in self.stats.components if c.kind == "api"])
        if self.commands is not None:
            yield from _commands(self.commands)


def _name(series: str) -> str:
    return PREFIX + series


def _counter(series: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(_name(series), doc, value=value)


def _gauge(series: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(_name(series), doc, value=value)


def _le(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it (``0.05``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == math.inf else repr(float(bound))


def _number(obj: object, attribute: str) -> float | None:
    """``obj.attribute`` when it is a finite number (not a bool), else None."""
    value = getattr(obj, attribute, None)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return value if math.isfinite(value) else None


def _hub(stats: GatewayStatistics) -> Iterator[Metric]:
    hub = stats.hub
    yield _counter("readings_published", "Readings published into the hub.", hub.published)
    # The hub keeps drops per subscription only; a subscription that ends takes its count
    # along (the counter then falls, which Prometheus treats as a reset).
    dropped = sum(s.dropped for s in hub.subscribers.values())
    yield _counter(
        "hub_dropped",
        "Readings dropped by hub subscriptions that fell behind (sum over open ones).",
        dropped,
    )
    yield _gauge(
        "hub_subscriptions", "Open hub subscriptions (consumers of readings).", hub.subscriptions
    )


def _components(components: Iterable[SupervisedStatistics]) -> Iterator[Metric]:
    labels = ["name", "kind"]
    up = GaugeMetricFamily(
        _name("component_up"), "1 while the component is up or degraded, else 0.", labels=labels
    )
    state = GaugeMetricFamily(
        _name("component_state"),
        "1 for the component's current state, 0 for the others.",
        labels=[*labels, "state"],
    )
    restarts = CounterMetricFamily(
        _name("component_restarts"), "Restarts by the supervisor.", labels=labels
    )
    failures = CounterMetricFamily(
        _name("component_failures"), "Failures seen by the supervisor.", labels=labels
    )
    for c in components:
        current = c.health.state
        up.add_metric([c.name, c.kind], 1 if current in (State.UP, State.DEGRADED) else 0)
        for s in State:
            state.add_metric([c.name, c.kind, s.value], 1 if s is current else 0)
        restarts.add_metric([c.name, c.kind], c.restarts)
        failures.add_metric([c.name, c.kind], c.total_failures)
    yield from (up, state, restarts, failures)


def _buses(buses: Iterable[SupervisedStatistics]) -> Iterator[Metric]:
    labels = ["bus", "device"]
    counters = {
        attribute: CounterMetricFamily(_name(series), doc, labels=labels)
        for attribute, series, doc in _BUS_COUNTERS
    }
    latency = GaugeMetricFamily(
        _name("bus_latency_seconds"),
        "Average time from request to answer since the bus started.",
        labels=labels,
    )
    for bus in buses:
        devices = getattr(bus.part, "devices", None)
        sources: Iterable[tuple[str, object]]
        if isinstance(devices, Mapping):
            sources = sorted((str(k), v) for k, v in devices.items())
        elif bus.part is not None:
            sources = [("", bus.part)]
        else:
            sources = []  # between two attempts: no counters to show
        for device, values in sources:
            for attribute, family in counters.items():
                value = _number(values, attribute)
                if value is not None:
                    family.add_metric([bus.name, device], value)
            avg_ms = _number(values, "latency_avg_ms")
            if avg_ms is not None:
                latency.add_metric([bus.name, device], avg_ms / 1000)
    yield from counters.values()
    yield latency


def _device_planes(planes: list[DevicePlaneStatistics]) -> Iterator[Metric]:
    if not planes:
        return
    yield _gauge(
        "wss_connections", "Open device plane connections.", sum(p.connections for p in planes)
    )
    for attribute, series, doc in (
        ("messages_in", "wss_messages_in", "Frames received from devices."),
        ("messages_out", "wss_messages_out", "Frames sent to devices."),
        ("bytes_in", "wss_bytes_in", "Payload bytes received from devices."),
        ("bytes_out", "wss_bytes_out", "Payload bytes sent to devices."),
        ("dropped", "wss_dropped", "Readings dropped for devices that read too slowly."),
        ("refused", "wss_refused", "Handshakes refused (401, 403, 503)."),
    ):
        yield _counter(series, doc, sum(getattr(p, attribute) for p in planes))


def _outbox(outboxes: list[OutboxStatistics]) -> Iterator[Metric]:
    if not outboxes:
        return
    o = outboxes[0]  # a gateway has one outbox
    yield _gauge(
        "outbox_backlog_readings", "Readings stored, not yet taken by CPI.", o.backlog_readings
    )
    yield _gauge(
        "outbox_backlog_bytes", "Size of the backlog as counted against max_bytes.", o.backlog_bytes
    )
    yield _gauge("outbox_dead_letters", "Batches CPI refused, kept for replay.", o.dead_letters)
    yield _gauge("outbox_file_bytes", "Outbox database plus WAL file.", o.file_bytes)
    dropped = CounterMetricFamily(
        _name("outbox_dropped"), "Readings lost before CPI, by why.", labels=["reason"]
    )
    dropped.add_metric(["hub"], o.dropped_hub)
    dropped.add_metric(["full"], o.dropped_full)
    dropped.add_metric(["rejected"], o.rejected)
    dropped.add_metric(["write-failed"], o.write_failed)
    yield dropped


def _api(parts: list[object]) -> Iterator[Metric]:
    """The API's own requests (``gateway.api.ApiStatistics``, read by name: the API imports
    this module), so refused logins can be graphed and alerted on."""
    if not parts or parts[0] is None:
        return
    api = parts[0]
    requests = CounterMetricFamily(
        _name("api_requests"), "Requests to the HTTPS API by HTTP status.", labels=["status"]
    )
    by_status: Mapping[str, int] = getattr(api, "by_status", {})
    for status, count in sorted(by_status.items()):
        requests.add_metric([status], count)
    yield requests
    failures = _number(api, "auth_failures")
    if failures is not None:
        yield _counter(
            "api_auth_failures", "API requests refused for a wrong user or password.", failures
        )


def _cpi(forwarders: list[ForwarderStatistics]) -> Iterator[Metric]:
    if not forwarders:
        return
    f = forwarders[0]  # a gateway has one forwarder
    requests = CounterMetricFamily(
        _name("cpi_requests"),
        'Batch POSTs to CPI by HTTP status ("error": no answer).',
        labels=["status"],
    )
    for status, count in sorted(f.responses.items()):
        requests.add_metric([status], count)
    yield requests
    yield HistogramMetricFamily(
        _name("cpi_request_duration_seconds"),
        "How long each batch POST to CPI took, answered or not.",
        buckets=[(_le(b), n) for b, n in f.request_seconds.cumulative()],
        sum_value=f.request_seconds.total,
    )
    yield _counter("cpi_readings_delivered", "Readings CPI confirmed.", f.readings_delivered)
    yield _counter("cpi_batches_delivered", "Batches CPI confirmed.", f.batches_delivered)
    yield _counter("cpi_retries", "Batch POSTs sent again after a failure.", f.retries)
    yield _counter("cpi_dead_letters", "Batches CPI refused for good.", f.dead_letters)
    if f.last_success is not None:
        yield _gauge(
            "cpi_last_success_timestamp_seconds",
            "When CPI last confirmed a batch (Unix time).",
            f.last_success,
        )


def _commands(commands: CommandStatistics) -> Iterator[Metric]:
    by_state = GaugeMetricFamily(
        _name("commands"), "Commands the router keeps, by state.", labels=["state"]
    )
    for state, count in sorted(commands.by_state.items()):
        by_state.add_metric([state], count)
    yield by_state
    yield _counter("commands_executed", "Commands executed or delivered.", commands.executed)
    yield _counter(
        "commands_rejected", "Commands refused as bad input (nothing ran).", commands.rejected
    )
    yield _counter(
        "commands_unmatched_acks",
        "Device acks for no command delivered to that device.",
        commands.unmatched_acks,
    )
