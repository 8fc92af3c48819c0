"""The CPI forwarder against the CPI stand-in over real TLS (trustme) on 127.0.0.1.

Real httpx, real hypercorn, real sockets: the clock is Trio's real one (autojump would jump
past the socket waits), so timeouts and backoffs are configured in milliseconds. Tests wait
for events (a batch recorded, the outbox changing), never for a fixed time. The outbox is
``MemoryOutbox``, an in-memory ``BatchSource`` with the outbox's contract.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import httpx
import pytest
import trio
import trustme

from gateway import forwarder
from gateway.core.batches import Batch, BatchSource, Gap, StoredReading, batch_id
from gateway.core.component import State
from gateway.core.configtypes import Duration, Secret, Size
from gateway.core.reading import Reading
from gateway.cpistandin import CpiStandIn, Fault, ReceivedBatch, serve_standin
from gateway.forwarder import (
    CpiSection,
    Forwarder,
    TokenCache,
    Verdict,
    classify,
    json_payload,
    parse_retry_after,
    retry_delay,
    xml_payload,
)

GATEWAY = "plant-7"
TIMEOUT = 10.0


# ---- an in-memory outbox ----------------------------------------------------------------------


class Progress:
    """A forwarder's ``progress`` callback (called after each attempt): tests wait on it
    instead of polling the statistics."""

    def __init__(self) -> None:
        self._changed = trio.Event()

    def __call__(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait(self) -> None:
        """Until the next call."""
        await self._changed.wait()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        with trio.fail_after(TIMEOUT):
            while not predicate():
                await self.wait()


class MemoryOutbox:
    """``BatchSource`` in memory, with the outbox's rules: the batch in flight comes back
    unchanged until confirmed, split or dead-lettered."""

    def __init__(self) -> None:
        self.pending: list[StoredReading] = []
        self.in_flight: Batch | None = None
        self.gaps: list[Gap] = []
        self.dead: list[tuple[Batch, int | None, str]] = []
        self.confirmed: list[Batch] = []
        self._changed = Progress()
        self._seq = 0

    def add(self, count: int, *, value_size: int = 0) -> None:
        for _ in range(count):
            self._seq += 1
            value: float | str = self._seq * 1.5 if not value_size else "x" * value_size
            reading = Reading(f"line-1/meter/p{self._seq}", value, unit="kW", timestamp=1.7e9)
            self.pending.append(StoredReading(self._seq, reading.topic, reading.encoded()))
        self._notify()

    def _notify(self) -> None:
        self._changed()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        await self._changed.wait_until(predicate)

    async def wait_pending(self) -> None:
        while not self.pending:
            await self._changed.wait()

    async def next_batch(self, max_readings: int, max_bytes: int) -> Batch | None:
        await trio.lowlevel.checkpoint()
        if self.in_flight is not None:
            self.in_flight = attrs.evolve(self.in_flight, sent_before=True)
            return self.in_flight
        if not self.pending:
            return None
        cut: list[StoredReading] = []
        size = 0
        for r in self.pending[:max_readings]:
            if cut and size + len(r.payload) > max_bytes:
                break
            cut.append(r)
            size += len(r.payload)
        self.in_flight = Batch(cut[0].seq, cut[-1].seq, tuple(cut), gaps=tuple(self.gaps))
        return self.in_flight

    def _take(self, batch: Batch) -> None:
        assert self.in_flight is not None
        assert (batch.first_seq, batch.last_seq) == (
            self.in_flight.first_seq,
            self.in_flight.last_seq,
        )
        self.pending = self.pending[len(batch.readings) :]
        self.in_flight = None
        self.gaps = []

    async def confirm(self, batch: Batch) -> None:
        await trio.lowlevel.checkpoint()
        self._take(batch)
        self.confirmed.append(batch)
        self._notify()

    async def split(self, batch: Batch) -> None:
        await trio.lowlevel.checkpoint()
        assert len(batch.readings) > 1
        half = batch.readings[: len(batch.readings) // 2]
        self.in_flight = Batch(half[0].seq, half[-1].seq, half, gaps=batch.gaps)
        self._notify()

    async def dead_letter(self, batch: Batch, status: int | None, excerpt: str) -> None:
        await trio.lowlevel.checkpoint()
        self._take(batch)
        self.dead.append((batch, status, excerpt))
        self._notify()


def test_memory_outbox_is_a_batch_source() -> None:
    source: BatchSource = MemoryOutbox()
    assert source is not None


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> dict[str, Path]:
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("edge-gateway-client")
    files = {
        "cert": tmp_path / "server.pem",
        "key": tmp_path / "server.key",
        "ca": tmp_path / "ca.pem",
        "client_cert": tmp_path / "client.pem",
        "client_key": tmp_path / "client.key",
        "secret": tmp_path / "client-secret",
    }
    server.cert_chain_pems[0].write_to_path(files["cert"])
    server.private_key_pem.write_to_path(files["key"])
    ca.cert_pem.write_to_path(files["ca"])
    # As in a CPI service key: the PEM's line breaks as literal \n sequences.
    files["client_cert"].write_text(client.cert_chain_pems[0].bytes().decode().replace("\n", "\\n"))
    files["client_key"].write_text(client.private_key_pem.bytes().decode().replace("\n", "\\n"))
    files["secret"].write_text("secret")
    return files


def secret(path: Path) -> Secret:
    return Secret(path, path.read_text())


class Clock:
    """A settable clock shared by the stand-in's and the forwarder's token expiry."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cpi(clock: Clock) -> CpiStandIn:
    return CpiStandIn(clock=clock)


@pytest.fixture
async def port(cpi: CpiStandIn, tls_files: dict[str, Path], nursery: trio.Nursery) -> int:
    port: int = await nursery.start(
        lambda task_status: serve_standin(
            cpi, cert_file=tls_files["cert"], key_file=tls_files["key"], task_status=task_status
        )
    )
    return port


def make_section(port: int, files: dict[str, Path], **changes: object) -> CpiSection:
    base = CpiSection(
        url=f"https://127.0.0.1:{port}/http/edge/readings",
        auth="oauth2",
        token_url=f"https://127.0.0.1:{port}/oauth/token",
        client_id="sb-edge-gateway",
        client_secret_file=secret(files["secret"]),
        ca_file=secret(files["ca"]),
        batch_max_readings=5,
        linger=Duration(0.0),
        timeout=Duration(0.5),
        backoff_initial=Duration(0.01),
        max_backoff=Duration(0.05),
    )
    return attrs.evolve(base, **changes)


async def start(
    nursery: trio.Nursery,
    section: CpiSection,
    outbox: MemoryOutbox,
    clock: Clock | None = None,
    **options: object,
) -> Forwarder:
    forwarder = Forwarder(
        section,
        outbox,
        gateway=GATEWAY,
        rng=random.Random(7),
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    await nursery.start(forwarder.run)
    return forwarder


# ---- delivery through every fault -------------------------------------------------------------


async def test_every_reading_arrives_in_order_once_through_every_fault(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], clock: Clock, nursery: trio.Nursery
) -> None:
    outbox = MemoryOutbox()
    outbox.add(40)
    cpi.faults.extend(
        [
            Fault.respond(429, retry_after="1"),
            Fault.respond(500, b"Internal error in iFlow"),
            Fault.respond(503),
            Fault.respond(413),  # split before anything was processed
            Fault.reset(),
            Fault.respond(502),
            Fault.slow(1.0),  # processed, answered after the client's 0.5 s deadline
            Fault.respond(504),
            Fault.respond(408),
            Fault.respond(425),
        ]
    )
    forwarder = await start(nursery, make_section(port, tls_files), outbox, clock)
    await outbox.wait_until(lambda: not outbox.pending)

    assert cpi.seqs() == list(range(1, 41))
    assert cpi.duplicates == 1  # the slow answer's batch came again, with the same id
    assert not outbox.dead
    for b in cpi.batches.values():
        assert b.message_id.startswith(f"{GATEWAY}-{b.seqs[0]}-{b.seqs[-1]}-")
    stats = forwarder.statistics()
    assert stats.retries == 9
    assert stats.splits == 1
    assert stats.readings_delivered == 40
    assert stats.failing_since is None
    assert stats.last_success is not None
    assert forwarder.delays[0] >= 1.0  # Retry-After: 1
    assert all(d <= 0.05 for d in forwarder.delays[1:])
    assert forwarder.condition().state is State.UP
    # Each POST counted by how it ended (for /metrics), and timed: the slow one too.
    for status in ("429", "500", "503", "413", "502", "504", "408", "425"):
        assert stats.responses[status] == 1, status
    assert stats.responses["error"] == 2  # the reset and the slow answer
    assert stats.responses["200"] == sum(stats.responses.values()) - 10
    assert stats.request_seconds.count == sum(stats.responses.values())
    slow = [n for bound, n in stats.request_seconds.cumulative() if bound >= 0.5]
    assert slow[0] < stats.request_seconds.count  # not all were fast...
    assert stats.request_seconds.total >= 0.5  # ...the slow one waited its 0.5 s deadline


async def test_retry_after_as_http_date_and_health_while_failing(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], nursery: trio.Nursery
) -> None:
    outbox = MemoryOutbox()
    outbox.add(1)
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    cpi.faults.extend([Fault.respond(503, retry_after=date)] * 50)
    progress = Progress()
    forwarder = await start(
        nursery,
        make_section(port, tls_files),
        outbox,
        progress=progress,
        wall_clock=lambda: 1445412480 - 0.2,  # the date is 0.2 s ahead
    )
    await progress.wait_until(lambda: forwarder.statistics().retries >= 3)
    assert forwarder.delays[:3] == [pytest.approx(0.2)] * 3  # beyond max_backoff (0.05 s)
    condition = forwarder.condition()
    assert condition.state is State.DEGRADED
    assert condition.reason is not None
    assert condition.reason.startswith("failing ")
    assert condition.reason.endswith("(503)")
    assert outbox.pending
    cpi.faults.clear()
    await outbox.wait_until(lambda: not outbox.pending)
    assert forwarder.condition().state is State.UP


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120", now=0) == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 30) == 30
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 + 30) == 0
    assert parse_retry_after("soon", now=0) is None
    assert parse_retry_after(None, now=0) is None
    assert parse_retry_after("99999999", now=0) == 3600
    assert parse_retry_after("9" * 400, now=0) == 3600
    # Digits to str.isdigit(), but not to HTTP (and float("²") raises).
    assert parse_retry_after("²", now=0) is None
    assert parse_retry_after("١٢٠", now=0) is None
    assert parse_retry_after("Wed, 21 Oct 99999 07:28:00 GMT", now=0) is None


async def test_odd_values_from_cpi_are_failures_not_crashes(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], nursery: trio.Nursery
) -> None:
    token = b'{"access_token":"t","expires_in":%s}'
    cpi.token_faults.extend(
        Fault.respond(200, token % value, content_type="application/json")
        for value in (b"9" * 400, b"NaN", b"-1", b'"soon"')
    )
    cpi.faults.append(Fault.respond(503, retry_after="²"))
    outbox = MemoryOutbox()
    outbox.add(2)
    forwarder = await start(nursery, make_section(port, tls_files), outbox)
    await outbox.wait_until(lambda: not outbox.pending)
    stats = forwarder.statistics()
    assert stats.token_fetches == 5
    assert stats.retries == 5
    assert stats.responses == {"error": 4, "503": 1, "200": 1}
    assert all(d <= 0.05 for d in forwarder.delays)  # "²" is no Retry-After
    assert cpi.seqs() == [1, 2]


def test_full_jitter_backoff() -> None:
    rng = random.Random(1)
    delays = [retry_delay(n, 1.0, 300.0, rng) for n in range(1, 20) for _ in range(20)]
    assert min(delays) < 0.1  # full jitter: anywhere from 0
    assert max(delays) <= 300.0
    assert all(retry_delay(1, 1.0, 300.0, rng) <= 1.0 for _ in range(50))
    assert retry_delay(1, 1.0, 300.0, rng, retry_after=7.0) >= 7.0


@pytest.mark.parametrize(
    ("status", "body", "verdict"),
    [
        (200, b"", Verdict.DELIVERED),
        (202, b"", Verdict.DELIVERED),
        (204, b"", Verdict.DELIVERED),
        *[(s, b"", Verdict.RETRY) for s in (408, 425, 429, 500, 502, 503, 504)],
        (413, b"", Verdict.TOO_LARGE),
        (500, b"Body size limit exceeded", Verdict.TOO_LARGE),
        (500, b"Request entity too large", Verdict.TOO_LARGE),
        # Transient overloads that also say "exceeded": retried, never split.
        (500, b"Rate limit exceeded", Verdict.RETRY),
        (500, b"Maximum number of concurrent messages exceeded, try again later", Verdict.RETRY),
        *[(s, b"", Verdict.REFUSED) for s in (400, 404, 415, 422, 409)],
        (401, b"", Verdict.AUTH),
        (403, b"", Verdict.AUTH),
    ],
)
def test_response_rules(status: int, body: bytes, verdict: Verdict) -> None:
    assert classify(status, body) is verdict


# ---- auth -------------------------------------------------------------------------------------


async def test_token_renewed_before_expiry(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], clock: Clock, nursery: trio.Nursery
) -> None:
    outbox = MemoryOutbox()
    outbox.add(3)
    forwarder = await start(nursery, make_section(port, tls_files), outbox, clock)
    await outbox.wait_until(lambda: not outbox.pending)
    clock.now += 3600 - 59  # inside the 60 s margin: renewed before use, never a 401
    outbox.add(3)
    await outbox.wait_until(lambda: not outbox.pending)
    assert forwarder.statistics().token_fetches == 2
    assert 401 not in cpi.statuses()
    assert cpi.seqs() == list(range(1, 7))


def test_token_cache() -> None:
    cache = TokenCache()
    assert cache.valid(0) is None
    cache.store("t", 3600, now=100)
    assert cache.valid(100 + 3539) == "t"
    assert cache.valid(100 + 3540) is None
    cache.store("t", 10, now=0)  # short-lived: renewed half-way
    assert cache.valid(4.9) == "t"
    assert cache.valid(5) is None


async def test_token_refreshed_once_on_401(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], clock: Clock, nursery: trio.Nursery
) -> None:
    outbox = MemoryOutbox()
    outbox.add(2)
    forwarder = await start(nursery, make_section(port, tls_files), outbox, clock)
    await outbox.wait_until(lambda: not outbox.pending)
    cpi.revoke_tokens()
    outbox.add(2)
    await outbox.wait_until(lambda: not outbox.pending)
    assert cpi.statuses() == [200, 401, 200]
    assert forwarder.statistics().token_fetches == 2
    assert forwarder.statistics().retries == 0


async def test_bad_credentials_keep_the_data_and_say_so(
    cpi: CpiStandIn,
    port: int,
    tls_files: dict[str, Path],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "gateway.forwarder")
    cpi.client_secret = "rotated"
    outbox = MemoryOutbox()
    outbox.add(2)
    progress = Progress()
    forwarder = await start(nursery, make_section(port, tls_files), outbox, progress=progress)
    await progress.wait_until(lambda: forwarder.statistics().retries >= 2)
    assert forwarder.delays[0] == 0.05  # at the backoff cap
    assert outbox.pending
    assert not outbox.dead
    assert forwarder.condition().reason is not None
    assert "token 401" in forwarder.condition().reason  # type: ignore[operator]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert errors
    assert "credentials" in errors[0].getMessage()
    assert "secret" not in caplog.text.replace("secret or", "").replace("client_secret", "")


async def test_basic_auth_and_the_stand_in_prints_each_batch(
    cpi: CpiStandIn,
    port: int,
    tls_files: dict[str, Path],
    nursery: trio.Nursery,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cpi.auth = "basic"
    cpi.echo = True
    outbox = MemoryOutbox()
    outbox.add(3)
    forwarder = await start(nursery, make_section(port, tls_files, auth="basic"), outbox)
    await outbox.wait_until(lambda: not outbox.pending)
    assert cpi.seqs() == [1, 2, 3]
    assert forwarder.statistics().token_fetches == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"CPI stand-in: batch {batch_id(GATEWAY, 1, 3)} seq 1..3 readings=3 bytes="
        + str(len(next(iter(cpi.batches.values())).body))
    ]


@pytest.mark.parametrize(("grace", "confirmed"), [(5.0, True), (0.05, False)])
async def test_stop_gives_the_batch_in_flight_a_bounded_moment(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], grace: float, confirmed: bool
) -> None:
    cpi.faults.append(Fault.slow(0.3))
    outbox = MemoryOutbox()
    outbox.add(3)
    section = make_section(port, tls_files, timeout=Duration(5.0), shutdown_grace=Duration(grace))
    forwarder = Forwarder(section, outbox, gateway=GATEWAY)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(forwarder.run)
            await cpi.wait_readings(3)  # processed by CPI, its answer still on the way
            forwarder.stop()
    # run() returned by itself; the batch is confirmed only if the answer came in time.
    assert (not outbox.pending) is confirmed
    assert forwarder.statistics().batches_delivered == int(confirmed)


async def test_client_certificate_mtls_with_service_key_newlines(
    tls_files: dict[str, Path], nursery: trio.Nursery
) -> None:
    cpi = CpiStandIn(auth="client-certificate", csrf=False)
    port: int = await nursery.start(
        lambda task_status: serve_standin(
            cpi,
            cert_file=tls_files["cert"],
            key_file=tls_files["key"],
            client_ca_file=tls_files["ca"],
            task_status=task_status,
        )
    )
    assert "\\n" in tls_files["client_key"].read_text()
    outbox = MemoryOutbox()
    outbox.add(7)
    section = make_section(
        port,
        tls_files,
        auth="client-certificate",
        token_url=None,
        client_id=None,
        client_secret_file=None,
        cert_file=secret(tls_files["client_cert"]),
        key_file=secret(tls_files["client_key"]),
        csrf=False,
        format="xml",
    )
    assert list(section.check()) == []
    await start(nursery, section, outbox)
    await outbox.wait_until(lambda: not outbox.pending)
    assert cpi.seqs() == list(range(1, 8))
    assert all("xml" in b.content_type for b in cpi.batches.values())

    # Without a client certificate the handshake fails: a connection error, data kept.
    outbox2 = MemoryOutbox()
    outbox2.add(1)
    progress = Progress()
    forwarder = await start(nursery, attrs.evolve(section, auth="none"), outbox2, progress=progress)
    await progress.wait_until(lambda: forwarder.statistics().retries >= 1)
    assert "connection failed" in (forwarder.statistics().last_failure_reason or "")
    assert outbox2.pending


# ---- CSRF -------------------------------------------------------------------------------------


async def test_csrf_fetched_once_bound_to_cookie_and_refetched_on_403(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], clock: Clock, nursery: trio.Nursery
) -> None:
    outbox = MemoryOutbox()
    outbox.add(15)
    forwarder = await start(nursery, make_section(port, tls_files), outbox, clock)
    await outbox.wait_until(lambda: not outbox.pending)
    assert forwarder.statistics().csrf_fetches == 1
    assert cpi.statuses() == [200, 200, 200]
    assert cpi.statuses("HEAD") == [200]

    cpi.forget_sessions()  # CPI restarted: the token is no longer valid
    outbox.add(5)
    await outbox.wait_until(lambda: not outbox.pending)
    assert cpi.statuses()[3:] == [403, 200]
    assert forwarder.statistics().csrf_fetches == 2
    assert cpi.seqs() == list(range(1, 21))


async def test_csrf_token_without_its_session_cookie_is_refused(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path]
) -> None:
    cpi.auth = "none"
    url = f"https://127.0.0.1:{port}/http/edge/readings"
    trust = ssl.create_default_context(cafile=tls_files["ca"])
    async with httpx.AsyncClient(verify=trust) as client:
        fetched = await client.head(url, headers={"X-CSRF-Token": "Fetch"})
        token = fetched.headers["x-csrf-token"]
        with_cookie = await client.post(url, headers={"X-CSRF-Token": token}, content=b"{}")
    async with httpx.AsyncClient(verify=trust) as other:
        without = await other.post(url, headers={"X-CSRF-Token": token}, content=b"{}")
    assert with_cookie.status_code == 200
    assert without.status_code == 403


# ---- size and refusals ------------------------------------------------------------------------


@pytest.mark.parametrize("too_large_status", [413, 500])
async def test_too_large_batches_split_down_to_one_reading_then_dead_letter(
    cpi: CpiStandIn,
    port: int,
    tls_files: dict[str, Path],
    nursery: trio.Nursery,
    too_large_status: int,
) -> None:
    cpi.max_body = 700
    cpi.too_large_status = too_large_status
    outbox = MemoryOutbox()
    outbox.add(8)
    outbox.add(1, value_size=1000)  # seq 9: alone it is still too large
    outbox.add(3)
    forwarder = await start(nursery, make_section(port, tls_files, batch_max_readings=100), outbox)
    await outbox.wait_until(lambda: not outbox.pending)
    assert cpi.seqs() == [1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12]
    assert [(b.first_seq, s) for b, s, _ in outbox.dead] == [(9, too_large_status)]
    assert "limit" in outbox.dead[0][2]
    assert forwarder.statistics().splits >= 2
    assert all(len(b.body) <= 700 for b in cpi.batches.values())


async def test_dead_letters_for_400_and_404(
    cpi: CpiStandIn,
    port: int,
    tls_files: dict[str, Path],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, "gateway.forwarder")
    outbox = MemoryOutbox()
    outbox.add(10)
    cpi.faults.append(Fault.respond(400, b"Mapping failed: unexpected element"))
    forwarder = await start(nursery, make_section(port, tls_files), outbox)
    await outbox.wait_until(lambda: not outbox.pending)
    assert cpi.seqs() == [6, 7, 8, 9, 10]  # the first batch is a dead letter, then carry on
    assert [(b.first_seq, b.last_seq, s) for b, s, _ in outbox.dead] == [(1, 5, 400)]
    assert "Mapping failed" in outbox.dead[0][2]
    assert forwarder.statistics().dead_letters == 1

    wrong = MemoryOutbox()
    wrong.add(2)
    section = make_section(port, tls_files, url=f"https://127.0.0.1:{port}/http/edge/typo")
    await start(nursery, section, wrong)
    await wrong.wait_until(lambda: not wrong.pending)
    assert [s for _, s, _ in wrong.dead] == [404]
    assert "iFlow not deployed or wrong address" in caplog.text
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2  # one clear line per dead letter


# ---- commands in the response -----------------------------------------------------------------


async def test_commands_in_a_response_go_to_the_router(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path], nursery: trio.Nursery
) -> None:
    outbox = MemoryOutbox()
    routed: list[object] = []
    confirmed_then: list[bool] = []

    async def router(commands: Sequence[object]) -> None:
        await trio.lowlevel.checkpoint()
        routed.extend(commands)
        confirmed_then.append(not outbox.pending)

    command = {"id": "c1", "topic": "line-1/valve/open", "value": True}
    cpi.commands = [command]
    outbox.add(1)
    await start(nursery, make_section(port, tls_files), outbox, command_router=router)
    await outbox.wait_until(lambda: not outbox.pending)
    assert routed == [command]
    # Handed on before the batch is confirmed: a cancel while confirming cannot lose them.
    assert confirmed_then == [False]


class SlowConfirm(MemoryOutbox):
    """An outbox whose worker is busy: ``confirm`` waits until cancelled."""

    def __init__(self) -> None:
        super().__init__()
        self.confirming = trio.Event()

    async def confirm(self, batch: Batch) -> None:
        self.confirming.set()
        await trio.sleep_forever()


async def test_commands_survive_a_cancel_while_the_batch_is_confirmed(
    cpi: CpiStandIn, port: int, tls_files: dict[str, Path]
) -> None:
    routed: list[object] = []

    async def router(commands: Sequence[object]) -> None:
        await trio.lowlevel.checkpoint()
        routed.extend(commands)

    command = {"id": "c1", "topic": "line-1/valve/open", "value": True}
    cpi.commands = [command]
    outbox = SlowConfirm()
    outbox.add(1)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await start(nursery, make_section(port, tls_files), outbox, command_router=router)
            await outbox.confirming.wait()
            nursery.cancel_scope.cancel()  # a restart while the outbox's worker is busy
    assert routed == [command]
    assert outbox.pending  # not confirmed: sent again after the restart


async def test_a_huge_answer_confirms_the_batch_and_its_commands_are_ignored(
    cpi: CpiStandIn,
    port: int,
    tls_files: dict[str, Path],
    nursery: trio.Nursery,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, "gateway.forwarder")
    routed: list[object] = []

    async def router(commands: Sequence[object]) -> None:
        await trio.lowlevel.checkpoint()
        routed.extend(commands)

    # 1100 commands of about 1 KB: past the 1 MiB read.
    cpi.commands = [{"id": f"c{i}", "target": "x", "value": "v" * 1000} for i in range(1100)]
    assert len(json.dumps({"commands": cpi.commands})) > forwarder.MAX_ANSWER_BYTES
    outbox = MemoryOutbox()
    outbox.add(1)
    fwd = await start(nursery, make_section(port, tls_files), outbox, command_router=router)
    await outbox.wait_until(lambda: not outbox.pending)
    assert routed == []
    assert fwd.statistics().batches_delivered == 1
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "not read to its end" in warnings[0]

    # At most MAX_COMMANDS of one answer reach the router.
    many: list[object] = [{"id": f"c{i}"} for i in range(forwarder.MAX_COMMANDS + 5)]
    cpi.commands = list(many)
    outbox.add(1)
    await outbox.wait_until(lambda: not outbox.pending)
    assert routed == many[: forwarder.MAX_COMMANDS]
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2
    assert f"holds {forwarder.MAX_COMMANDS + 5} commands" in warnings[1]


async def test_the_stand_in_can_keep_only_the_last_batches_without_bodies(
    tls_files: dict[str, Path], nursery: trio.Nursery
) -> None:
    seen: list[ReceivedBatch] = []
    cpi = CpiStandIn(auth="none", csrf=False, keep_bodies=False, history=2, on_batch=seen.append)
    port: int = await nursery.start(
        lambda task_status: serve_standin(
            cpi, cert_file=tls_files["cert"], key_file=tls_files["key"], task_status=task_status
        )
    )
    outbox = MemoryOutbox()
    outbox.add(5)
    section = make_section(port, tls_files, auth="none", csrf=False, batch_max_readings=1)
    await start(nursery, section, outbox)
    await outbox.wait_until(lambda: not outbox.pending)
    assert [b.seqs for b in seen] == [(1,), (2,), (3,), (4,), (5,)]
    assert all(b.body for b in seen)  # on_batch gets the body...
    assert [b.seqs for b in cpi.batches.values()] == [(4,), (5,)]
    assert all(b.body == b"" for b in cpi.batches.values())  # ...the stand-in keeps none
    assert len(cpi.requests) == 2


# ---- payloads ---------------------------------------------------------------------------------


def sample_batch() -> Batch:
    readings = [
        Reading("line-1/meter/power", 12.5, unit="kW", timestamp=1.7e9),
        Reading("line-1/meter/ok", True, timestamp=1.7e9 + 0.25),
        Reading.bad("line-1/plc/name", "timeout"),
        Reading("devices/hmi/note", 'a <b> & "c" \x01 é', timestamp=1.7e9),
        Reading("line-1/meter/count", 7, timestamp=1.7e9),
    ]
    stored = tuple(StoredReading(10 + i, r.topic, r.encoded()) for i, r in enumerate(readings))
    return Batch(10, 14, stored, gaps=(Gap(after_seq=9, count=3, reason="hub overflow"),))


def test_json_payload_joins_the_stored_readings() -> None:
    batch = sample_batch()
    body = json_payload(GATEWAY, batch)
    data = json.loads(body)
    assert data["gateway"] == GATEWAY
    assert data["batch"] == batch_id(GATEWAY, 10, 14)
    assert (data["first_seq"], data["last_seq"]) == (10, 14)
    assert data["gaps"] == [{"after_seq": 9, "count": 3, "reason": "hub overflow"}]
    assert [r["seq"] for r in data["readings"]] == [10, 11, 12, 13, 14]
    for stored, sent in zip(batch.readings, data["readings"], strict=True):
        assert stored.payload[1:] in body  # joined, not re-serialised
        assert {k: v for k, v in sent.items() if k != "seq"} == json.loads(stored.payload)
    assert data["readings"][0]["ts"] == "2023-11-14T22:13:20.000Z"


def test_xml_payload_parses_and_matches_the_json() -> None:
    batch = sample_batch()
    body = xml_payload(GATEWAY, batch, root="EdgeReadings", element="Item")
    assert body.startswith(b"<?xml version=")
    root = ET.fromstring(body)
    data = json.loads(json_payload(GATEWAY, batch))
    assert root.tag == "EdgeReadings"
    assert root.attrib == {
        "gateway": GATEWAY,
        "batch": data["batch"],
        "firstSeq": "10",
        "lastSeq": "14",
    }
    gaps = [g.attrib for g in root.findall("Gap")]
    assert gaps == [{"afterSeq": "9", "count": "3", "reason": "hub overflow"}]
    items = root.findall("Item")
    assert len(items) == len(data["readings"])
    for item, reading in zip(items, data["readings"], strict=True):
        assert int(item.attrib["seq"]) == reading["seq"]
        assert item.findtext("Topic") == reading["topic"]
        assert item.findtext("Quality") == reading["quality"]
        assert item.findtext("Timestamp") == reading["ts"]
        assert item.findtext("Unit") == reading.get("unit")
        assert item.findtext("Reason") == reading.get("reason")
        value = item.find("Value")
        assert value is not None
        kind, text = value.attrib["type"], value.text
        if kind == "null":
            assert reading["value"] is None
        elif kind == "boolean":
            assert (text == "true") is reading["value"]
        elif kind == "number":
            assert float(text or "nan") == reading["value"]
        else:
            # Control characters XML 1.0 cannot carry become U+FFFD; the rest is exact.
            assert text == reading["value"].replace("\x01", "\ufffd")


# ---- config -----------------------------------------------------------------------------------


def test_section_check(tls_files: dict[str, Path]) -> None:
    good = make_section(443, tls_files)
    assert list(good.check()) == []
    bad = attrs.evolve(
        good,
        url="http://cpi.example/http/x",
        token_url=None,
        client_secret_file=None,
        xml_root="1bad",
        batch_max_readings=0,
        batch_max_bytes=Size(10),
        max_backoff=Duration(0.001),
    )
    keys = {k for k, _ in bad.check()}
    assert keys == {
        "url",
        "token_url",
        "client_secret_file",
        "xml_root",
        "batch_max_readings",
        "batch_max_bytes",
        "max_backoff",
    }
    cert = attrs.evolve(good, auth="client-certificate")
    assert {k for k, _ in cert.check()} == {"cert_file", "key_file"}


def test_an_excerpt_of_an_answer_is_safe_for_a_log_line() -> None:
    assert forwarder._excerpt(b"bad \x00\r\x1b[2J bytes\xff") == "bad \\x00\\r\\x1b[2J bytes\ufffd"
