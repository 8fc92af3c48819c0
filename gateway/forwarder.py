"""The CPI forwarder: outbox batches -> HTTPS POST to an SAP Cloud Integration iFlow.

Three layers, as everywhere in the gateway:

- Config: ``CpiSection`` (``[cpi]``), checked with ``check()`` like every section.
- Pure code, no sockets or clocks: the payloads (``json_payload``, ``xml_payload``), the
  verdict on a response (``classify``), ``Retry-After`` parsing and the full-jitter delay,
  the OAuth token cache (``TokenCache``, fed the time by its caller).
- ``Forwarder``, a supervised part: one ``httpx.AsyncClient`` (keep-alive) that takes batches
  from a ``BatchSource`` (the outbox), authenticates (OAuth2 client credentials, client
  certificate, Basic, none), fetches CSRF tokens, POSTs, and confirms, splits, dead-letters or
  retries each batch by the rules of issue 8. A batch is confirmed only after a 2xx, so
  whatever is not confirmed stays in the outbox; every retry carries the same batch id.

Commands in a 2xx response (``{"commands": [...]}``, see ``docs/cpi.md``) go to a
``command_router`` (the composition root passes ``gateway.commands.CommandRouter.from_cpi``).

Depends on ``gateway.core`` only (batches, component, config types, logs), plus httpx.
"""

from __future__ import annotations

import base64
import collections
import email.utils
import enum
import json
import logging
import math
import os
import random
import re
import ssl
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Literal

import attrs
import httpx
import trio

from gateway.core.batches import Batch, BatchSource, batch_id
from gateway.core.component import UP, Condition, State
from gateway.core.configtypes import Duration, Secret, Size, format_duration
from gateway.core.histogram import Histogram, HistogramSnapshot
from gateway.core.logs import kv

log = logging.getLogger("gateway.forwarder")

AuthMode = Literal["oauth2", "client-certificate", "basic", "none"]
PayloadFormat = Literal["json", "xml"]

TOKEN_MARGIN = 60.0
"""A cached OAuth token is renewed this long before it expires."""
MAX_RETRY_AFTER = 3600.0
"""A ``Retry-After`` longer than this is taken as this: a typo in an iFlow must not park the
gateway for days."""
EXCERPT = 300
"""Characters of a refused response's body kept with a dead letter and in the log line."""
MAX_ANSWER_BYTES = 1024**2
"""The most of one answer that is read (token, CSRF fetch, a batch's answer): the rest is left
unread. A 2xx answer longer than this still confirms its batch; commands in it are ignored."""
MAX_COMMANDS = 1000
"""Commands taken from one answer; any beyond are ignored (with one warning)."""

_XML_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# XML 1.0 forbids these code points even escaped; a reading's text must not break the document.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
# Body-size wording only: a 500 that says "rate limit exceeded" or "maximum number of
# concurrent messages exceeded" is a transient failure to retry, not a reason to split.
_SIZE_LIMIT_TEXT = re.compile(r"size limit|body size|too large|entity too large", re.IGNORECASE)


# ---- config -----------------------------------------------------------------------------------


@attrs.frozen
class CpiSection:
    """``[cpi]``: where and how readings are forwarded to SAP Cloud Integration."""

    url: str
    """The iFlow endpoint: ``<runtime url from the service key>/http/<address>``."""
    auth: AuthMode = "oauth2"
    token_url: str | None = None
    """OAuth2 only: the service key's ``tokenurl`` (``.../oauth/token``)."""
    client_id: str | None = None
    client_secret_file: Secret | None = None
    cert_file: Secret | None = None
    """client-certificate only: the certificate chain (PEM; literal ``\\n`` accepted)."""
    key_file: Secret | None = None
    ca_file: Secret | None = None
    """Extra CA certificates (PEM) to trust besides the system's."""
    csrf: bool = True
    """The HTTPS sender adapter's "CSRF Protected" (on by default in CPI)."""
    format: PayloadFormat = "json"
    xml_root: str = "Readings"
    xml_element: str = "Reading"
    batch_max_readings: int = 1000
    batch_max_bytes: Size = Size(250 * 1000)
    """CPI meters messages in 250 KB slices."""
    linger: Duration = Duration(1.0)
    """How long a reading may wait for others to fill its batch when nothing is backlogged."""
    timeout: Duration = Duration(60.0)
    """Overall deadline of one request (token, CSRF fetch or POST)."""
    backoff_initial: Duration = Duration(1.0)
    max_backoff: Duration = Duration(300.0)
    shutdown_grace: Duration = Duration(5.0)
    """On a graceful stop, how long the batch in flight may take to finish."""

    def check(self) -> Iterator[tuple[str, str]]:
        """``(key, message)`` below ``cpi`` for every problem."""
        try:
            url = httpx.URL(self.url)
        except httpx.InvalidURL as e:
            yield "url", f"{self.url!r} is not a URL ({e})"
        else:
            if url.scheme != "https" or not url.host:
                yield (
                    "url",
                    f"{self.url!r}: give the iFlow's https:// address, e.g. "
                    "https://<tenant>.it-cpi018-rt.cfapps.eu10.hana.ondemand.com/http/edge/readings",
                )
        if self.auth == "oauth2" and not (self.token_url or "").startswith("https://"):
            yield "token_url", "oauth2 needs the service key's tokenurl (https://...)"
        if self.auth in ("oauth2", "basic"):
            if not self.client_id:
                yield "client_id", f"{self.auth} needs the service key's clientid"
            if self.client_secret_file is None:
                yield (
                    "client_secret_file",
                    f"{self.auth} needs a file holding the service key's clientsecret",
                )
        if self.auth == "client-certificate":
            for key, marker in (("cert_file", "CERTIFICATE"), ("key_file", "PRIVATE KEY")):
                secret: Secret | None = getattr(self, key)
                if secret is None:
                    yield key, "client-certificate needs the service key's certificate and key"
                elif marker not in secret.reveal():
                    yield key, f"holds no PEM {marker.lower()} (-----BEGIN ...{marker}-----)"
        if self.ca_file is not None and "-----BEGIN CERTIFICATE-----" not in self.ca_file.reveal():
            yield "ca_file", "holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        for key in ("xml_root", "xml_element"):
            if not _XML_NAME.fullmatch(getattr(self, key)):
                yield key, f"{getattr(self, key)!r} is not an XML element name"
        if self.batch_max_readings < 1:
            yield "batch_max_readings", "must be at least 1"
        if self.batch_max_bytes < 1024:
            yield "batch_max_bytes", "must be at least 1KiB"
        if not 0 <= self.linger <= 60:
            yield "linger", "must be from 0 to 1min"
        for key in ("timeout", "backoff_initial", "max_backoff"):
            if getattr(self, key) <= 0:
                yield key, "must be greater than 0"
        if self.max_backoff < self.backoff_initial:
            yield "max_backoff", "must be at least backoff_initial"
        if self.timeout > 600:
            yield "timeout", "must be at most 10min (CPI ends inbound calls after 10 minutes)"

    def describe(self) -> str:
        return (
            f"cpi: {self.url} auth={self.auth} csrf={'on' if self.csrf else 'off'} "
            f"format={self.format} batch<={self.batch_max_readings} readings/"
            f"{self.batch_max_bytes} bytes linger={format_duration(self.linger)}"
        )


# ---- payloads (pure) --------------------------------------------------------------------------


def json_payload(gateway: str, batch: Batch) -> bytes:
    """The batch as JSON. The stored readings are joined as they are (no re-serialisation):
    each gets its ``seq`` spliced in front of its own fields.

    ``{"gateway", "batch", "first_seq", "last_seq", "gaps": [{"after_seq", "count",
    "reason"}], "readings": [{"seq", "topic", "value", "quality", "ts", "unit"?,
    "reason"?}]}``
    """
    head = json.dumps(
        {
            "gateway": gateway,
            "batch": batch_id(gateway, batch.first_seq, batch.last_seq, batch.epoch),
            "first_seq": batch.first_seq,
            "last_seq": batch.last_seq,
            "gaps": [attrs.asdict(g) for g in batch.gaps],
        },
        separators=(",", ":"),
    ).encode()
    parts = []
    for r in batch.readings:
        body = r.payload.strip()
        if not body.startswith(b"{") or body == b"{}":
            raise ValueError(f"stored reading {r.seq} is not a JSON object")
        parts.append(b'{"seq":%d,%s' % (r.seq, body[1:]))
    return head[:-1] + b',"readings":[' + b",".join(parts) + b"]}"


def _xml_text(value: object) -> str:
    return _XML_INVALID.sub("\ufffd", str(value))


def xml_payload(
    gateway: str, batch: Batch, root: str = "Readings", element: str = "Reading"
) -> bytes:
    """The batch as XML (UTF-8, with a declaration). Same content as ``json_payload``::

    <Readings gateway=".." batch=".." firstSeq="1" lastSeq="2">
      <Gap afterSeq="0" count="3" reason=".."/>
      <Reading seq="1"><Topic/><Value type="number|string|boolean|null"/>
        <Unit/>? <Quality/> <Reason/>? <Timestamp/></Reading>
    </Readings>
    """
    top = ET.Element(
        root,
        {
            "gateway": _xml_text(gateway),
            "batch": _xml_text(batch_id(gateway, batch.first_seq, batch.last_seq, batch.epoch)),
            "firstSeq": str(batch.first_seq),
            "lastSeq": str(batch.last_seq),
        },
    )
    for gap in batch.gaps:
        ET.SubElement(
            top,
            "Gap",
            {
                "afterSeq": str(gap.after_seq),
                "count": str(gap.count),
                "reason": _xml_text(gap.reason),
            },
        )
    for r in batch.readings:
        data = json.loads(r.payload)
        item = ET.SubElement(top, element, {"seq": str(r.seq)})
        ET.SubElement(item, "Topic").text = _xml_text(data.get("topic", r.topic))
        value = data.get("value")
        if value is None:
            ET.SubElement(item, "Value", {"type": "null"})
        elif isinstance(value, bool):
            ET.SubElement(item, "Value", {"type": "boolean"}).text = "true" if value else "false"
        elif isinstance(value, int | float):
            ET.SubElement(item, "Value", {"type": "number"}).text = repr(value)
        else:
            ET.SubElement(item, "Value", {"type": "string"}).text = _xml_text(value)
        if data.get("unit") is not None:
            ET.SubElement(item, "Unit").text = _xml_text(data["unit"])
        ET.SubElement(item, "Quality").text = _xml_text(data.get("quality", "good"))
        if data.get("reason") is not None:
            ET.SubElement(item, "Reason").text = _xml_text(data["reason"])
        ET.SubElement(item, "Timestamp").text = _xml_text(data.get("ts", ""))
    return bytes(ET.tostring(top, encoding="UTF-8", xml_declaration=True))


def payload(section: CpiSection, gateway: str, batch: Batch) -> tuple[bytes, str]:
    """The request body and its content type."""
    if section.format == "xml":
        body = xml_payload(gateway, batch, section.xml_root, section.xml_element)
        return body, "application/xml; charset=utf-8"
    return json_payload(gateway, batch), "application/json"


# ---- response rules (pure) --------------------------------------------------------------------


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    """Transient: same batch again after a backoff."""
    TOO_LARGE = "too-large"
    """Split the batch (a single reading: dead letter)."""
    REFUSED = "refused"
    """For good: dead letter, carry on."""
    AUTH = "auth"
    """401/403 that persist after a refresh: keep the data, retry at the backoff cap."""


RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def classify(status: int, body: bytes) -> Verdict:
    """The response rules of issue 8, for a response that is final (token and CSRF refresh
    already tried)."""
    if 200 <= status < 300:
        return Verdict.DELIVERED
    if status == 413 or (status == 500 and _SIZE_LIMIT_TEXT.search(_excerpt(body))):
        return Verdict.TOO_LARGE
    if status in (401, 403):
        return Verdict.AUTH
    if status in RETRY_STATUSES:
        return Verdict.RETRY
    if 400 <= status < 500:
        return Verdict.REFUSED
    return Verdict.RETRY  # other 5xx, 1xx, 3xx: the tenant may be on its way back


def _excerpt(body: bytes) -> str:
    """The start of an answer, safe for a log line: control characters (a NUL, a carriage
    return) are escaped."""
    text = body[: EXCERPT * 4].decode("utf-8", "replace")[:EXCERPT]
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def parse_retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After`` as seconds from ``now`` (wall clock): delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # "²".isdigit() too, but float() refuses it
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return min(max(when.timestamp() - now, 0.0), MAX_RETRY_AFTER)
    except (TypeError, ValueError, OverflowError):
        return None


def retry_delay(
    failures: int,
    initial: float,
    maximum: float,
    rng: random.Random,
    retry_after: float | None = None,
) -> float:
    """Exponential backoff with full jitter: uniform in ``[0, min(maximum, initial *
    2**(failures-1))]``, but never shorter than the server's ``Retry-After``."""
    ceiling = min(maximum, initial * 2.0 ** min(max(failures - 1, 0), 62))
    delay = rng.uniform(0, ceiling)
    return max(delay, retry_after or 0.0)


@attrs.define
class TokenCache:
    """One OAuth2 access token, renewed ``TOKEN_MARGIN`` before it expires (or half-way for
    short-lived tokens). The caller gives the time."""

    token: str | None = None
    renew_at: float = -math.inf

    def valid(self, now: float) -> str | None:
        return self.token if self.token is not None and now < self.renew_at else None

    def store(self, token: str, expires_in: float, now: float) -> None:
        self.token = token
        self.renew_at = now + expires_in - min(TOKEN_MARGIN, expires_in / 2)

    def clear(self) -> None:
        self.token = None
        self.renew_at = -math.inf


# ---- the forwarder ----------------------------------------------------------------------------


class DeliveryError(Exception):
    """A request to CPI failed in a way that keeps the batch for a retry."""

    def __init__(self, reason: str, *, retry_after: float | None = None, auth: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after
        self.auth = auth


@attrs.frozen
class Answer:
    """What CPI answered: at most ``MAX_ANSWER_BYTES`` of the body (``complete`` says whether
    that was all of it)."""

    status_code: int
    headers: httpx.Headers
    content: bytes
    complete: bool = True


CommandRouter = Callable[[Sequence[object]], Awaitable[None]]
"""Takes the commands of a CPI response (``gateway.commands.CommandRouter.from_cpi``)."""


async def log_commands(commands: Sequence[object]) -> None:
    """The command router of a forwarder built without one (tests): logs them."""
    await trio.lowlevel.checkpoint()
    for command in commands:
        log.info("command from CPI (no router)", extra=kv(command=json.dumps(command)))


@attrs.frozen
class ForwarderStatistics:
    batches_delivered: int
    readings_delivered: int
    requests: int
    retries: int
    splits: int
    dead_letters: int
    token_fetches: int
    csrf_fetches: int
    last_success: float | None
    """Wall clock (UTC seconds) of the last 2xx."""
    last_failure: float | None
    last_failure_reason: str | None
    failing_since: float | None
    """Wall clock of the first failure since the last 2xx; None while CPI answers."""
    responses: Mapping[str, int] = attrs.field(factory=dict)
    """Batch POSTs by how they ended: the HTTP status (``"200"``, ``"503"``) or ``"error"``
    (no answer: timeout, connection failed)."""
    request_seconds: HistogramSnapshot = attrs.field(factory=lambda: Histogram().snapshot())
    """How long each batch POST took, answer or not (with a CSRF or token refetch in it)."""


class Forwarder:
    """A supervised part: takes batches from ``source`` and delivers them to CPI.

    ``stop()`` asks for a graceful end: waits end at once, the batch in flight gets
    ``shutdown_grace`` to finish (and be confirmed). A plain cancel ends everything at once;
    either way whatever was not confirmed stays in the outbox.
    """

    def __init__(
        self,
        section: CpiSection,
        source: BatchSource,
        *,
        gateway: str,
        command_router: CommandRouter = log_commands,
        progress: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.section = section
        self.source = source
        self.gateway = gateway
        self.command_router = command_router
        self._progress = progress
        self._rng = rng or random.Random()
        self._clock = clock or trio.current_time
        self._wall_clock = wall_clock
        self._token = TokenCache()
        self._csrf_token: str | None = None
        self._failures = 0
        self._backlogged = False
        self._run_scope: trio.CancelScope | None = None
        self._in_flight: trio.CancelScope | None = None
        self._stopping = False
        self.delays: list[float] = []
        """Backoff delays taken, most recent last (the last 32; for statistics and tests)."""
        self._batches = 0
        self._readings = 0
        self._requests = 0
        self._retries = 0
        self._splits = 0
        self._dead = 0
        self._token_fetches = 0
        self._csrf_fetches = 0
        self._last_success: float | None = None
        self._last_failure: float | None = None
        self._last_reason: str | None = None
        self._failing_since: float | None = None
        self._responses: collections.Counter[str] = collections.Counter()
        self._latency = Histogram()

    # ---- health -----------------------------------------------------------------------------

    def condition(self) -> Condition:
        if self._failing_since is None:
            return UP
        since = format_duration(max(1, round(self._wall_clock() - self._failing_since)))
        return Condition(State.DEGRADED, f"failing {since} ({self._last_reason})")

    def statistics(self) -> ForwarderStatistics:
        return ForwarderStatistics(
            batches_delivered=self._batches,
            readings_delivered=self._readings,
            requests=self._requests,
            retries=self._retries,
            splits=self._splits,
            dead_letters=self._dead,
            token_fetches=self._token_fetches,
            csrf_fetches=self._csrf_fetches,
            last_success=self._last_success,
            last_failure=self._last_failure,
            last_failure_reason=self._last_reason,
            failing_since=self._failing_since,
            responses=dict(self._responses),
            request_seconds=self._latency.snapshot(),
        )

    # ---- running ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Graceful stop: the batch in flight gets ``shutdown_grace``, then ``run`` returns."""
        self._stopping = True
        if self._in_flight is not None:
            self._in_flight.shield = True
            self._in_flight.deadline = trio.current_time() + self.section.shutdown_grace
        if self._run_scope is not None:
            self._run_scope.cancel()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with httpx.AsyncClient(
            verify=tls_context(self.section),
            timeout=httpx.Timeout(self.section.timeout),
            follow_redirects=False,
        ) as client:
            self._client = client
            task_status.started()
            with trio.CancelScope() as self._run_scope:
                if self._stopping:
                    return
                while True:
                    await self._round()

    async def _round(self) -> None:
        await self.source.wait_pending()
        # Linger gathers a new batch; a retry (after a failure) goes when its backoff says.
        if not self._backlogged and not self._failures and self.section.linger > 0:
            await trio.sleep(self.section.linger)
        batch = await self.source.next_batch(
            self.section.batch_max_readings, self.section.batch_max_bytes
        )
        if batch is None:
            return
        self._backlogged = (
            len(batch.readings) >= self.section.batch_max_readings
            or batch.size >= self.section.batch_max_bytes
        )
        delay = 0.0
        with trio.CancelScope() as self._in_flight:
            delay = await self._deliver(batch)
        if self._in_flight.cancelled_caught:  # only a stop's grace deadline lands here
            log.warning(
                "stopped before CPI answered: the batch stays in the outbox for the next start",
                extra=kv(
                    batch=batch_id(self.gateway, batch.first_seq, batch.last_seq, batch.epoch)
                ),
            )
        self._in_flight = None
        if self._stopping:
            await trio.lowlevel.checkpoint()  # stop() cancelled the run scope: ends here
        self._progress()
        if delay:
            self.delays = [*self.delays[-31:], delay]
            await trio.sleep(delay)

    async def _deliver(self, batch: Batch) -> float:
        """Send ``batch`` once and act on the answer; the delay before the next attempt."""
        bid = batch_id(self.gateway, batch.first_seq, batch.last_seq, batch.epoch)
        context = {"batch": bid, "readings": len(batch.readings)}
        body, content_type = payload(self.section, self.gateway, batch)
        started = trio.current_time()
        try:
            response = await self._post(body, content_type, bid)
        except DeliveryError as e:
            self._responses["error"] += 1
            return self._failed(e.reason, context, retry_after=e.retry_after, auth=e.auth)
        finally:
            self._latency.observe(trio.current_time() - started)
        self._responses[str(response.status_code)] += 1
        verdict = classify(response.status_code, response.content)
        status = response.status_code
        excerpt = _excerpt(response.content)
        mpl = response.headers.get("sap_messageprocessinglogid")
        if mpl:  # CPI's message processing log: lets an operator find this call in CPI
            context["mpl"] = mpl
        if verdict is Verdict.DELIVERED:
            # Commands first: the router only parses them and starts them in the background
            # (it never raises for bad input), so nothing waits here. Confirming waits for
            # the outbox's worker; a cancel there (a restart) would otherwise lose them.
            # Cancelled before the confirm, the batch is sent again and the router drops
            # commands it already has (by id).
            await self._route_commands(response, bid)
            await self.source.confirm(batch)
            self._delivered(batch, response, context)
            return 0.0
        if verdict is Verdict.TOO_LARGE and len(batch.readings) > 1:
            log.warning(
                "CPI refused the batch as too large: splitting it",
                extra=kv(**context, status=status, bytes=len(body)),
            )
            await self.source.split(batch)
            self._splits += 1
            return 0.0
        if verdict in (Verdict.TOO_LARGE, Verdict.REFUSED):
            hint = {
                404: "iFlow not deployed or wrong address: check cpi.url and the iFlow",
                413: "a single reading is larger than the iFlow's body size limit",
                415: "the iFlow does not accept this content type: check cpi.format",
            }.get(status, "CPI refused the batch")
            log.error(
                "%s: batch moved to dead letters",
                hint,
                extra=kv(**context, status=status, body=excerpt),
            )
            await self.source.dead_letter(batch, status, excerpt)
            self._dead += 1
            return 0.0
        retry_after = parse_retry_after(response.headers.get("retry-after"), self._wall_clock())
        return self._failed(
            f"{status}", context, retry_after=retry_after, auth=verdict is Verdict.AUTH
        )

    def _delivered(self, batch: Batch, response: Answer, context: dict[str, object]) -> None:
        self._batches += 1
        self._readings += len(batch.readings)
        self._last_success = self._wall_clock()
        if self._failing_since is not None:
            log.info("CPI delivery recovered", extra=kv(**context))
        self._failing_since = None
        self._failures = 0
        log.debug(
            "batch delivered",
            extra=kv(**context, status=response.status_code),
        )

    def _failed(
        self,
        reason: str,
        context: dict[str, object],
        *,
        retry_after: float | None,
        auth: bool,
    ) -> float:
        self._failures += 1
        self._retries += 1
        now = self._wall_clock()
        self._last_failure = now
        self._last_reason = reason
        if self._failing_since is None:
            self._failing_since = now
        s = self.section
        if auth:
            delay = max(s.max_backoff, retry_after or 0.0)
            log.error(
                "CPI refuses the gateway's credentials (%s): check cpi.auth, the client id "
                "and secret or certificate, and the role ESBMessaging.send; readings are kept",
                reason,
                extra=kv(**context, retry_in=f"{delay:.1f}s"),
            )
        else:
            delay = retry_delay(
                self._failures, s.backoff_initial, s.max_backoff, self._rng, retry_after
            )
            log.warning(
                "CPI delivery failed, will retry the same batch",
                extra=kv(**context, reason=reason, retry_in=f"{delay:.1f}s"),
            )
        return delay

    async def _route_commands(self, response: Answer, bid: str) -> None:
        if not response.content.strip().startswith(b"{"):
            return
        if not response.complete:
            log.warning(
                "CPI's answer is longer than %d bytes and was not read to its end: commands "
                "in it are ignored (the batch counts as delivered)",
                MAX_ANSWER_BYTES,
                extra=kv(batch=bid),
            )
            return
        try:
            data = json.loads(response.content)
        except (ValueError, RecursionError):  # not JSON, or nested beyond any real answer
            log.warning(
                "CPI's answer looks like JSON but cannot be read: commands in it are ignored",
                extra=kv(batch=bid),
            )
            return
        commands = data.get("commands") if isinstance(data, dict) else None
        if isinstance(commands, list) and commands:
            if len(commands) > MAX_COMMANDS:
                log.warning(
                    "CPI's answer holds %d commands: the first %d are taken, the rest ignored",
                    len(commands),
                    MAX_COMMANDS,
                    extra=kv(batch=bid),
                )
                commands = commands[:MAX_COMMANDS]
            await self.command_router(commands)

    # ---- HTTP -------------------------------------------------------------------------------

    async def _post(self, body: bytes, content_type: str, bid: str) -> Answer:
        """POST with auth and CSRF; a 401 renews the token once, a 403 the CSRF token once."""
        renewed_token = renewed_csrf = False
        while True:
            headers = {
                "Content-Type": content_type,
                "X-Message-ID": bid,
                "SAP_ApplicationID": bid,
                **await self._auth_headers(),
            }
            if self.section.csrf:
                if self._csrf_token is None:
                    refused = await self._fetch_csrf()
                    if refused is not None:
                        return refused
                assert self._csrf_token is not None
                headers["X-CSRF-Token"] = self._csrf_token
            response = await self._request("POST", self.section.url, headers=headers, content=body)
            if response.status_code == 401 and self.section.auth == "oauth2" and not renewed_token:
                renewed_token = True
                self._token.clear()
                continue
            if response.status_code == 403 and self.section.csrf and not renewed_csrf:
                renewed_csrf = True
                self._csrf_token = None
                continue
            return response

    async def _request(self, method: str, url: str, **kwargs: object) -> Answer:
        """One request; its answer read up to ``MAX_ANSWER_BYTES`` (leaving the rest unread
        closes the connection instead of returning it to the pool)."""
        self._requests += 1
        try:
            with trio.fail_after(self.section.timeout):
                async with self._client.stream(method, url, **kwargs) as response:  # type: ignore[arg-type]
                    content = bytearray()
                    complete = True
                    async for chunk in response.aiter_bytes():
                        content += chunk
                        if len(content) > MAX_ANSWER_BYTES:
                            del content[MAX_ANSWER_BYTES:]
                            complete = False
                            break
                    return Answer(response.status_code, response.headers, bytes(content), complete)
        except trio.TooSlowError:
            raise DeliveryError(f"timeout after {format_duration(self.section.timeout)}") from None
        except httpx.TimeoutException as e:
            raise DeliveryError(f"timeout ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise DeliveryError(f"connection failed ({type(e).__name__}: {e})") from None
        except httpx.DecodingError as e:  # a Content-Encoding that does not decode
            raise DeliveryError(f"answer cannot be decoded ({e})") from None

    async def _auth_headers(self) -> dict[str, str]:
        s = self.section
        if s.auth == "basic":
            assert s.client_id is not None
            assert s.client_secret_file is not None
            pair = f"{s.client_id}:{s.client_secret_file.reveal()}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
        if s.auth == "oauth2":
            token = self._token.valid(self._clock())
            if token is None:
                token = await self._fetch_token()
            return {"Authorization": f"Bearer {token}"}
        return {}

    async def _fetch_token(self) -> str:
        s = self.section
        assert s.token_url
        assert s.client_id is not None
        assert s.client_secret_file is not None
        self._token_fetches += 1
        response = await self._request(
            "POST",
            s.token_url,
            data={"grant_type": "client_credentials"},
            auth=httpx.BasicAuth(s.client_id, s.client_secret_file.reveal()),
            headers={"Accept": "application/json"},
        )
        if response.status_code in (400, 401, 403):
            raise DeliveryError(f"token {response.status_code}", auth=True)
        if response.status_code != 200:
            retry_after = parse_retry_after(response.headers.get("retry-after"), self._wall_clock())
            raise DeliveryError(f"token {response.status_code}", retry_after=retry_after)
        try:
            data = json.loads(response.content)
            token = data["access_token"]
            if not isinstance(token, str) or not token:
                raise TypeError
        except (ValueError, KeyError, TypeError, RecursionError):
            raise DeliveryError("token response without access_token") from None
        try:
            # A 400-digit number overflows float(); NaN or inf would make renew_at useless.
            expires_in = float(data.get("expires_in", 3600))
        except (ValueError, TypeError, OverflowError):
            expires_in = math.nan
        if not (math.isfinite(expires_in) and expires_in > 0):
            # Not quoted: the answer holds the token.
            raise DeliveryError("token response with an unusable expires_in")
        self._token.store(token, expires_in, self._clock())
        return token

    async def _fetch_csrf(self) -> Answer | None:
        """Fetch a CSRF token (and its session cookie, kept by the client). A refusal for good
        (404: wrong address) is returned, to be handled as the POST's answer would be."""
        self._csrf_fetches += 1
        for _ in range(2):
            headers = {"X-CSRF-Token": "Fetch", **await self._auth_headers()}
            response = await self._request("HEAD", self.section.url, headers=headers)
            if response.status_code == 401 and self.section.auth == "oauth2":
                self._token.clear()
                continue
            break
        token = response.headers.get("x-csrf-token")
        if response.status_code in (401, 403):
            raise DeliveryError(f"CSRF fetch {response.status_code}", auth=True)
        if not token or token.lower() == "required":
            if classify(response.status_code, b"") is Verdict.REFUSED:
                return response
            raise DeliveryError(f"CSRF fetch {response.status_code} without a token")
        self._csrf_token = token
        return None


def _unescape_pem(text: str) -> str:
    """A service key's PEM with literal ``\\n`` sequences, as real lines."""
    return text.replace("\\n", "\n").strip() + "\n"


def tls_context(section: CpiSection) -> ssl.SSLContext:
    """The client's TLS: the system's CAs (plus ``ca_file``), and the client certificate for
    ``client-certificate``."""
    context = ssl.create_default_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if section.ca_file is not None:
        context.load_verify_locations(cadata=_unescape_pem(section.ca_file.reveal()))
    if section.auth == "client-certificate":
        assert section.cert_file is not None
        assert section.key_file is not None
        # ssl loads a chain only from files: a private directory, removed at once.
        with tempfile.TemporaryDirectory(prefix="edge-gateway-cpi-") as tmp:
            cert = Path(tmp, "cert.pem")
            key = Path(tmp, "key.pem")
            for path, secret in ((cert, section.cert_file), (key, section.key_file)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(_unescape_pem(secret.reveal()))
            context.load_cert_chain(cert, key)
    return context


def make_forwarder(
    section: CpiSection, source: BatchSource, gateway: str, **options: object
) -> Callable[[Callable[[], None]], Forwarder]:
    """``make(progress)`` for ``gateway.supervisor.Supervised``."""

    def make(progress: Callable[[], None]) -> Forwarder:
        return Forwarder(section, source, gateway=gateway, progress=progress, **options)  # type: ignore[arg-type]

    return make
