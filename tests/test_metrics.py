"""``gateway.metrics.render``: a GatewayStatistics built from the real value classes, parsed
back with prometheus-client's own text parser (an independent reader of the format)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from drivers.modbus.bus import DeviceStatistics, ModbusBusStatistics
from drivers.modbus.link import LinkStatistics
from drivers.sim import SimBusStatistics
from gateway import metrics
from gateway.commands import CommandStatistics
from gateway.core.component import Health, StartPolicy, State
from gateway.core.histogram import Histogram
from gateway.deviceplane import DevicePlaneStatistics
from gateway.forwarder import ForwarderStatistics
from gateway.hub import HubStatistics, SubscriptionStatistics
from gateway.outbox import OutboxStatistics
from gateway.supervisor import GatewayStatistics, SupervisedStatistics

NOW = 1_800_000_000.0


def device_stats(**changes: Any) -> DeviceStatistics:
    values: dict[str, Any] = {
        "polls": 120,
        "requests": 240,
        "responses": 238,
        "timeouts": 2,
        "crc_errors": 1,
        "not_modbus": 0,
        "exceptions": 0,
        "disconnected": 0,
        "overruns": 0,
        "last_error": "timeout",
        "last_success": NOW - 1,
        "latency_last_ms": 12.0,
        "latency_max_ms": 40.0,
        "latency_avg_ms": 15.5,
        "writes": 3,
        "write_errors": 1,
    }
    values.update(changes)
    return DeviceStatistics(**values)


def modbus_stats(devices: dict[str, DeviceStatistics]) -> ModbusBusStatistics:
    link = LinkStatistics(
        up=True,
        connects=1,
        reconnects=0,
        resyncs=0,
        crc_errors=0,
        discarded_bytes=0,
        last_error=None,
    )
    return ModbusBusStatistics(link=link, devices=devices)


def plane_stats(connections: int = 2) -> DevicePlaneStatistics:
    return DevicePlaneStatistics(
        listening=True,
        port=8443,
        connections=connections,
        refused=4,
        messages_in=50,
        messages_out=70,
        bytes_in=5000,
        bytes_out=9000,
        dropped=6,
        revoked=0,
        clients=(),
    )


def outbox_stats() -> OutboxStatistics:
    return OutboxStatistics(
        backlog_readings=1234,
        backlog_bytes=56789,
        oldest_seq=10,
        next_seq=1244,
        in_flight=1,
        dead_letters=2,
        dead_readings=20,
        gaps=0,
        commits=99,
        dropped_hub=5,
        dropped_full=7,
        rejected=0,
        file_bytes=100000,
        write_failed=3,
    )


def forwarder_stats(failing_since: float | None = None) -> ForwarderStatistics:
    histogram = Histogram()
    for seconds in (0.03, 0.2, 0.2, 3.0, 100.0):
        histogram.observe(seconds)
    return ForwarderStatistics(
        batches_delivered=40,
        readings_delivered=4000,
        requests=47,
        retries=5,
        splits=0,
        dead_letters=2,
        token_fetches=1,
        csrf_fetches=2,
        last_success=NOW - 30 if failing_since is None else failing_since - 10,
        last_failure=None if failing_since is None else NOW - 5,
        last_failure_reason=None if failing_since is None else "503 Service Unavailable",
        failing_since=failing_since,
        responses={"200": 40, "503": 5, "error": 2},
        request_seconds=histogram.snapshot(),
    )


def component(
    name: str,
    kind: str,
    part: object | None,
    state: State = State.UP,
    reason: str | None = None,
    *,
    restarts: int = 0,
    last_error: str | None = None,
    policy: StartPolicy | None = None,
) -> SupervisedStatistics:
    """``policy`` by default as the gateway starts that kind: required for the outbox, the
    device plane and the API."""
    if policy is None:
        required = kind in ("outbox", "device plane", "api")
        policy = StartPolicy.REQUIRED if required else StartPolicy.SUPERVISED
    return SupervisedStatistics(
        name=name,
        kind=kind,
        health=Health(state, NOW - 60, reason, last_error),
        failures=0,
        total_failures=restarts,
        restarts=restarts,
        part=part,
        policy=policy,
    )


def hub_stats() -> HubStatistics:
    def sub(dropped: int) -> SubscriptionStatistics:
        return SubscriptionStatistics(("#",), "drop-oldest", 0, 1000, 500, dropped)

    return HubStatistics(
        published=98765,
        subscriptions=2,
        subscribers={"outbox": sub(3), "device plane": sub(4)},
        last_values=12,
    )


def gateway_statistics(
    components: Iterable[SupervisedStatistics] | None = None,
) -> GatewayStatistics:
    """A whole gateway: a Modbus bus with two devices, a sim bus, the device plane, the
    outbox, the forwarder, the command router and the API."""
    if components is None:
        components = [
            component(
                "plc",
                "bus",
                modbus_stats(
                    {"meter": device_stats(), "pump": device_stats(polls=7, latency_avg_ms=None)}
                ),
                State.DEGRADED,
                "pump not answering",
                restarts=1,
            ),
            component("line-1", "bus", SimBusStatistics(polls=55, overruns=0, points=3)),
            component("devices", "device plane", plane_stats()),
            component("outbox database", "outbox", outbox_stats()),
            component("cpi forwarder", "cpi", forwarder_stats()),
            component("commands", "commands", None),
        ]
    return GatewayStatistics(hub=hub_stats(), components=tuple(components))


def command_stats() -> CommandStatistics:
    return CommandStatistics(
        by_state={"pending": 2, "delivered": 1, "done": 30, "failed": 4, "expired": 1},
        executed=37,
        rejected=9,
        unmatched_acks=1,
    )


def parse(text: bytes) -> dict[str, list[Sample]]:
    """Samples by family name (counters without ``_total``)."""
    families = text_string_to_metric_families(text.decode())
    return {f.name: list(f.samples) for f in families}


def value(samples: dict[str, list[Sample]], series: str, /, **labels: str) -> float:
    """The one sample of ``name`` with exactly these labels."""
    found = [
        s.value
        for family in samples.values()
        for s in family
        if s.name == series and s.labels == labels
    ]
    assert len(found) == 1, (series, labels, found)
    return found[0]


def test_every_named_series_with_its_value() -> None:
    samples = parse(metrics.render(gateway_statistics(), command_stats()))
    p = "edge_gateway_"
    assert value(samples, p + "readings_published_total") == 98765
    assert value(samples, p + "hub_dropped_total") == 7
    # components
    assert value(samples, p + "component_up", name="plc", kind="bus") == 1  # degraded counts
    assert value(samples, p + "component_up", name="commands", kind="commands") == 1
    assert value(samples, p + "component_state", name="plc", kind="bus", state="degraded") == 1
    assert value(samples, p + "component_state", name="plc", kind="bus", state="up") == 0
    assert value(samples, p + "component_restarts_total", name="plc", kind="bus") == 1
    # Modbus, per device
    assert value(samples, p + "bus_polls_total", bus="plc", device="meter") == 120
    assert value(samples, p + "bus_polls_total", bus="plc", device="pump") == 7
    assert value(samples, p + "bus_timeouts_total", bus="plc", device="meter") == 2
    assert value(samples, p + "bus_crc_errors_total", bus="plc", device="meter") == 1
    assert value(samples, p + "bus_writes_total", bus="plc", device="meter") == 3
    assert value(samples, p + "bus_write_errors_total", bus="plc", device="meter") == 1
    assert value(samples, p + "bus_latency_seconds", bus="plc", device="meter") == 0.0155
    # A device that never answered has no latency rather than a made-up 0.
    assert not [s for s in samples[p + "bus_latency_seconds"] if s.labels.get("device") == "pump"]
    # a bus without devices: its own counters, device ""
    assert value(samples, p + "bus_polls_total", bus="line-1", device="") == 55
    assert not [s for s in samples[p + "bus_timeouts"] if s.labels["bus"] == "line-1"]
    # device plane
    assert value(samples, p + "wss_connections") == 2
    assert value(samples, p + "wss_messages_in_total") == 50
    assert value(samples, p + "wss_messages_out_total") == 70
    assert value(samples, p + "wss_bytes_in_total") == 5000
    assert value(samples, p + "wss_bytes_out_total") == 9000
    assert value(samples, p + "wss_dropped_total") == 6
    # outbox
    assert value(samples, p + "outbox_backlog_readings") == 1234
    assert value(samples, p + "outbox_backlog_bytes") == 56789
    assert value(samples, p + "outbox_dead_letters") == 2
    assert value(samples, p + "outbox_dropped_total", reason="hub") == 5
    assert value(samples, p + "outbox_dropped_total", reason="full") == 7
    assert value(samples, p + "outbox_dropped_total", reason="write-failed") == 3
    # CPI
    assert value(samples, p + "cpi_requests_total", status="200") == 40
    assert value(samples, p + "cpi_requests_total", status="503") == 5
    assert value(samples, p + "cpi_requests_total", status="error") == 2
    assert value(samples, p + "cpi_readings_delivered_total") == 4000
    assert value(samples, p + "cpi_last_success_timestamp_seconds") == NOW - 30
    # commands
    assert value(samples, p + "commands", state="done") == 30
    assert value(samples, p + "commands", state="pending") == 2
    assert value(samples, p + "commands_rejected_total") == 9


def test_cpi_latency_is_a_prometheus_histogram() -> None:
    families = {
        f.name: f
        for f in text_string_to_metric_families(metrics.render(gateway_statistics()).decode())
    }
    family = families["edge_gateway_cpi_request_duration_seconds"]
    assert family.type == "histogram"
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    # Cumulative: 0.03 <= 0.05; two of 0.2 <= 0.25; 3.0 <= 5; 100 only in +Inf.
    assert buckets["0.05"] == 1
    assert buckets["0.1"] == 1
    assert buckets["0.25"] == 3
    assert buckets["5.0"] == 4
    assert buckets["60.0"] == 4
    assert buckets["+Inf"] == 5
    count = [s.value for s in family.samples if s.name.endswith("_count")]
    total = [s.value for s in family.samples if s.name.endswith("_sum")]
    assert count == [5]
    assert math.isclose(total[0], 0.03 + 0.2 + 0.2 + 3.0 + 100.0)


def test_a_minimal_gateway_has_no_series_of_parts_it_lacks() -> None:
    stats = gateway_statistics([component("line-1", "bus", None, State.DOWN, "stopped")])
    samples = parse(metrics.render(stats, None))
    assert value(samples, "edge_gateway_component_up", name="line-1", kind="bus") == 0
    assert (
        value(samples, "edge_gateway_component_state", name="line-1", kind="bus", state="down") == 1
    )
    names = {s.name for family in samples.values() for s in family}
    assert not [n for n in names if "wss_" in n or "outbox_" in n or "cpi_" in n]
    assert "edge_gateway_commands" not in names
    assert "edge_gateway_bus_polls_total" not in names  # a bus between attempts


def test_a_cpi_part_without_forwarder_statistics_has_no_cpi_series() -> None:
    @attrs.frozen
    class OtherStatistics:
        readings_delivered: int = 1

    other = gateway_statistics([component("cpi", "cpi", OtherStatistics())])
    assert "edge_gateway_cpi_requests" not in parse(metrics.render(other))


def test_label_values_are_escaped() -> None:
    stats = gateway_statistics(
        [component('odd "bus"\\\n', "bus", modbus_stats({"m\n1": device_stats()}))]
    )
    samples = parse(metrics.render(stats))
    assert value(samples, "edge_gateway_bus_polls_total", bus='odd "bus"\\\n', device="m\n1") == 120


def test_api_requests_and_refused_logins() -> None:
    from gateway.api import ApiStatistics

    api = ApiStatistics(requests=12, by_status={"200": 9, "401": 3}, auth_failures=2, port=9443)
    samples = parse(metrics.render(gateway_statistics([component("api", "api", api)])))
    assert value(samples, "edge_gateway_api_requests_total", status="200") == 9
    assert value(samples, "edge_gateway_api_requests_total", status="401") == 3
    assert value(samples, "edge_gateway_api_auth_failures_total") == 2
    # Between attempts the API has no statistics: no series, no crash.
    samples = parse(metrics.render(gateway_statistics([component("api", "api", None)])))
    assert "edge_gateway_api_requests" not in samples
