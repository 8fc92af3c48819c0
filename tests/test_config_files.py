"""Loading the config file whatever it is: a FIFO, a device, something huge, UTF-16, nested
without end. Every failure is a ``ConfigError`` naming the problem and the fix; nothing hangs,
nothing raises anything else: in ``load_config``, in ``check-config`` (exit 78), in ``run``, and
in a SIGHUP reload, where the running config stays in effect. Also ``state_dir_problems``.
"""

from __future__ import annotations

import codecs
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from gateway.config import (
    MAX_CONFIG_FILE,
    MAX_NESTING,
    ConfigError,
    load_config,
    parse_config,
    state_dir_problems,
)
from gateway.core.configtypes import Secret
from tests.test_config import KINDS_WITH_TOKEN, TOKEN_BUS

if TYPE_CHECKING:
    from conftest import Daemon  # type: ignore[import-not-found]

RunGateway = Callable[..., subprocess.CompletedProcess[str]]

EX_CONFIG = 78
IS_ROOT = os.geteuid() == 0

TOO_DEEP = (
    f"tables and arrays nested too deeply (more than {MAX_NESTING} levels): no setting nests "
    "that deep; check the brackets"
)
UTF16 = (
    'is UTF-16 text (Notepad calls it "Unicode"): save it as UTF-8 (in Notepad: File, Save as, '
    'Encoding "UTF-8")'
)
VALID = '[gateway]\nname = "gw-1"\n'


@contextmanager
def fails_if_blocked(seconds: float = 5.0) -> Iterator[None]:
    """Turn a call that blocks (a read from a FIFO) into a test failure instead of a hang."""

    def alarm(signum: int, frame: object) -> None:
        raise AssertionError(f"blocked for {seconds}s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load_problems(path: Path) -> list[tuple[str, str]]:
    with fails_if_blocked(), pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    return info.value.problems


# ---- what the path is -------------------------------------------------------------------------


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "gateway.toml"
    os.mkfifo(fifo)  # no writer: a plain open() for reading would wait for ever
    assert load_problems(fifo) == [
        ("", "is a FIFO (named pipe), not a regular file: pass the path of the TOML config file")
    ]


def test_dev_zero_is_refused_unread() -> None:
    assert load_problems(Path("/dev/zero")) == [
        ("", "is a character device, not a regular file: pass the path of the TOML config file")
    ]


def test_directory_is_refused(tmp_path: Path) -> None:
    assert load_problems(tmp_path) == [
        ("", "is a directory, not a regular file: pass the path of the TOML config file")
    ]


def test_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gw.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        assert load_problems(path) == [
            ("", "is a socket, not a regular file: pass the path of the TOML config file")
        ]


def test_symlink_to_a_regular_file_is_followed(tmp_path: Path) -> None:
    (tmp_path / "real.toml").write_text(VALID)
    (tmp_path / "gateway.toml").symlink_to(tmp_path / "real.toml")
    assert load_config(tmp_path / "gateway.toml").gateway.name == "gw-1"


def test_symlink_to_a_fifo_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "gateway.toml").symlink_to(tmp_path / "fifo")
    assert load_problems(tmp_path / "gateway.toml")[0][1].startswith("is a FIFO (named pipe)")


def test_file_at_the_size_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    comment = b"#" * 99 + b"\n"
    body = VALID.encode()
    filler = comment * ((MAX_CONFIG_FILE - len(body)) // len(comment))
    data = body + filler
    data += b"#" * (MAX_CONFIG_FILE - len(data) - 1) + b"\n"
    assert len(data) == MAX_CONFIG_FILE
    path.write_bytes(data)
    assert load_config(path).gateway.name == "gw-1"


def test_file_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_bytes(VALID.encode() + b"#" * (MAX_CONFIG_FILE - len(VALID)) + b"\n")
    assert load_problems(path) == [
        (
            "",
            f"is {MAX_CONFIG_FILE + 1} bytes, more than the limit of 1MiB: pass the path of "
            "the TOML config file",
        )
    ]


def test_path_below_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    assert load_problems(tmp_path / "file" / "gateway.toml") == [
        ("", "cannot read: Not a directory")
    ]


def test_nul_in_the_path(tmp_path: Path) -> None:
    problems = load_problems(tmp_path / "gate\0way.toml")
    assert problems == [("", "cannot read: embedded null byte")]


@pytest.mark.skipif(IS_ROOT, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(VALID)
    path.chmod(0)
    assert load_problems(path) == [
        (
            "",
            "cannot read: Permission denied: let the gateway's user read it (or run "
            "check-config with sudo)",
        )
    ]


def test_out_of_memory_while_loading_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not producible for real without starving the test process; the file limit above is what
    # prevents it. This checks that the last line of defence reports rather than crashes.
    def no_memory(data: bytes) -> str:
        raise MemoryError

    monkeypatch.setattr("gateway.config.decode_config", no_memory)
    path = tmp_path / "gateway.toml"
    path.write_text(VALID)
    assert load_problems(path) == [("", "cannot read: out of memory")]


# ---- what the file holds ----------------------------------------------------------------------


def test_utf8_with_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(VALID, encoding="utf-8-sig")  # what Notepad writes as "UTF-8 with BOM"
    assert path.read_bytes().startswith(codecs.BOM_UTF8)
    assert load_config(path).gateway.name == "gw-1"


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
def test_utf16_is_named(tmp_path: Path, encoding: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(VALID, encoding=encoding)
    assert load_problems(path) == [("", UTF16)]


def test_utf32_is_named(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(VALID, encoding="utf-32")
    assert load_problems(path) == [("", "is UTF-32 text: save it as UTF-8")]


def test_latin1_says_where(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text('[gateway]\nname = "gw"\n# Kühlraum\n', encoding="latin-1")
    assert load_problems(path) == [
        ("", "is not UTF-8 text (byte 0xfc at line 3, column 4): save it as UTF-8")
    ]


def test_deep_nesting_in_a_file(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text("a = " + "[" * 1000 + "]" * 1000 + "\n")
    assert load_problems(path) == [("", TOO_DEEP)]


# ---- secret files are read the same way --------------------------------------------------------


def test_secret_fifo_is_refused_without_blocking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    os.mkfifo(tmp_path / "token")
    with fails_if_blocked(), pytest.raises(ConfigError) as info:
        parse_config(TOKEN_BUS.format("token"), config_dir=tmp_path, kinds=KINDS_WITH_TOKEN)
    assert info.value.problems == [
        (
            "buses[0].token_file",
            f"secret file '{tmp_path / 'token'}' is a FIFO (named pipe), not a regular file: "
            "give the path of the file that holds the secret",
        )
    ]


def test_secret_file_over_64_kib_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "token").write_bytes(b"x" * (64 * 1024 + 1))
    with pytest.raises(ConfigError) as info:
        parse_config(TOKEN_BUS.format("token"), config_dir=tmp_path, kinds=KINDS_WITH_TOKEN)
    assert info.value.problems == [
        (
            "buses[0].token_file",
            f"secret file '{tmp_path / 'token'}' is 65537 bytes, more than the limit of 64KiB: "
            "give the path of the file that holds the secret",
        )
    ]


def test_secret_with_byte_order_mark(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    (tmp_path / "token").write_text("s3cret\n", encoding="utf-8-sig")
    config = parse_config(TOKEN_BUS.format("token"), config_dir=tmp_path, kinds=KINDS_WITH_TOKEN)
    secret = config.buses[0].token_file  # type: ignore[attr-defined]
    assert isinstance(secret, Secret)
    assert secret.matches("s3cret")


# ---- the same through the real command ---------------------------------------------------------

SIM_POINT = """\
[[buses]]
name = "x"
kind = "sim"
[[buses.devices]]
name = "d"
points = [{{ name = "p", {} }}]
"""


def _write(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "gateway.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


CHECK_CASES = [
    pytest.param("a = " + "[" * 1000 + "]" * 1000, f"{{path}}: {TOO_DEEP}", id="deep-arrays"),
    pytest.param(
        "gateway = " + "{ a = " * 600 + "1" + " }" * 600, f"{{path}}: {TOO_DEEP}", id="deep-tables"
    ),
    pytest.param(
        '[gateway]\nshutdown_timeout = "1' + "0" * 400 + 's"\n',
        "{path}: gateway.shutdown_timeout: '1"
        + "0" * 48
        + "... (404 characters) is too long: a duration may be at most 365d (365 days)",
        id="duration-overflow",
    ),
    pytest.param(
        SIM_POINT.format("high = inf"),
        "{path}: buses[0].devices[0].points[0].high: inf is not a finite number: write a number",
        id="inf",
    ),
    pytest.param(
        SIM_POINT.format('signal = "counter", step = 1e308'),
        "{path}: buses[0].devices[0].points[0].step: 1e+308 is outside -1e9 .. 1e9",
        id="sim-step-1e308",
    ),
    pytest.param(
        '[gateway]\nname = "plant 7"\n',
        "{path}: gateway.name: 'plant 7' may use only letters, digits and _ . : - (no '/', '+', "
        "'#' or spaces: it becomes one level of a topic)",
        id="gateway-name",
    ),
    pytest.param(VALID.encode("utf-16"), f"{{path}}: {UTF16}", id="utf-16"),
]


@pytest.mark.parametrize(("content", "expected"), CHECK_CASES)
def test_check_config_exits_78(
    tmp_path: Path, run_gateway: RunGateway, content: str | bytes, expected: str
) -> None:
    path = _write(tmp_path, content)
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr.splitlines() == [
        expected.format(path=path),
        "1 problem(s); nothing was started",
    ]


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        pytest.param(
            lambda p: os.mkfifo(p),
            "is a FIFO (named pipe), not a regular file",
            id="fifo",
        ),
        pytest.param(
            lambda p: p.symlink_to("/dev/zero"),
            "is a character device, not a regular file",
            id="dev-zero",
        ),
    ],
)
def test_check_config_refuses_special_files(
    tmp_path: Path, run_gateway: RunGateway, make: Callable[[Path], None], expected: str
) -> None:
    path = tmp_path / "gateway.toml"
    make(path)
    result = run_gateway("check-config", "--config", str(path))  # times out if it hangs
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"{path}: {expected}: pass the path of the TOML config file"
    )


def test_check_config_accepts_byte_order_mark(tmp_path: Path, run_gateway: RunGateway) -> None:
    path = _write(tmp_path, codecs.BOM_UTF8 + VALID.encode())
    result = run_gateway("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "  gateway gw-1: state in" in result.stdout


def test_run_refuses_an_infinite_duration(
    tmp_path: Path, gateway_config: Callable[..., Path], run_gateway: RunGateway
) -> None:
    path = gateway_config(
        '[[buses]]\nname = "x"\nkind = "sim"\nfail_after = "1' + "0" * 400 + 's"\n'
    )
    result = run_gateway("run", "--config", str(path))
    assert result.returncode == EX_CONFIG, result.stderr
    assert "buses[1].fail_after: '1" in result.stderr
    assert "is too long: a duration may be at most 365d (365 days)" in result.stderr


@pytest.mark.parametrize(
    ("replace", "expected"),
    [
        pytest.param(
            lambda p: p.write_text("a = " + "[" * 1000 + "]" * 1000 + "\n"),
            TOO_DEEP,
            id="deep-nesting",
        ),
        pytest.param(
            lambda p: (p.unlink(), os.mkfifo(p)),  # type: ignore[func-returns-value]
            "is a FIFO (named pipe), not a regular file: pass the path of the TOML config file",
            id="fifo",
        ),
        pytest.param(
            lambda p: p.write_text(p.read_text() + SIM_POINT.format("step = nan")),
            "buses[1].devices[0].points[0].step: nan is not a finite number: write a number",
            id="nan",
        ),
    ],
)
def test_sighup_with_unloadable_config_keeps_running(
    gateway_config: Callable[..., Path],
    daemon: Callable[..., Daemon],
    replace: Callable[[Path], object],
    expected: str,
) -> None:
    path = gateway_config()
    d = daemon(path)
    d.wait_ready()
    replace(path)
    d.send_signal(signal.SIGHUP)
    line = d.wait_for_log("reload rejected: ")
    assert line.endswith(f"reload rejected: {path}: {expected}"), d.lines
    d.wait_for_log("reload rejected: keeping the running configuration")
    assert d.running
    d.send_signal(signal.SIGTERM)  # the event loop is not blocked: it stops in time
    assert d.wait_exit() == 0


# ---- state_dir_problems ------------------------------------------------------------------------


def state_problems(path: Path | str) -> list[tuple[str, str]]:
    config = parse_config(f"[gateway]\nstate_dir = '{path}'\n")
    return state_dir_problems(config)


def message(path: Path, reason: str) -> str:
    return (
        f"{str(path)!r} is not a writable directory ({reason}): create it for the gateway's "
        "user, or use systemd's StateDirectory="
    )


def test_state_dir_that_exists(tmp_path: Path) -> None:
    assert state_problems(tmp_path) == []


def test_state_dir_that_can_be_created(tmp_path: Path) -> None:
    assert state_problems(tmp_path / "a" / "b" / "state") == []
    assert not (tmp_path / "a").exists()  # nothing was created


def test_state_dir_below_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "sub" / "state"
    assert state_problems(path) == [
        (
            "gateway.state_dir",
            message(path, f"it cannot be created: {str(tmp_path / 'file')!r} is not a directory"),
        )
    ]


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_text("")
    assert state_problems(path) == [
        ("gateway.state_dir", message(path, "it exists and is not a directory"))
    ]


def _user() -> str:
    import pwd

    return f"user {pwd.getpwuid(os.geteuid()).pw_name}"


@pytest.mark.skipif(IS_ROOT, reason="root may write to a read-only directory")
def test_state_dir_read_only(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.mkdir()
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert state_problems(path) == [
            ("gateway.state_dir", message(path, f"{_user()} cannot write to it"))
        ]
    finally:
        path.chmod(stat.S_IRWXU)


@pytest.mark.skipif(IS_ROOT, reason="root may create directories anywhere")
def test_state_dir_in_a_read_only_parent(tmp_path: Path) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    path = parent / "a" / "state"
    try:
        assert state_problems(path) == [
            (
                "gateway.state_dir",
                message(
                    path, f"it does not exist, and {_user()} cannot create it in {str(parent)!r}"
                ),
            )
        ]
    finally:
        parent.chmod(stat.S_IRWXU)


def test_load_config_can_check_the_state_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = _write(tmp_path, f"[gateway]\nstate_dir = '{tmp_path / 'file' / 'state'}'\n")
    assert load_config(path).gateway.state_dir == str(tmp_path / "file" / "state")
    with pytest.raises(ConfigError) as info:
        load_config(path, check_state_dir=True)
    assert [p for p, _ in info.value.problems] == ["gateway.state_dir"]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n   \n# another\n"])
def test_a_file_without_settings_is_refused(tmp_path: Path, text: str) -> None:
    # Caught half-written by an editor, it would otherwise reload as "all defaults" and stop
    # every bus and the device plane.
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    assert load_problems(path) == [
        (
            "",
            "the file has no settings (empty, or only comments): if an editor is saving it, "
            "reload once it is done; start from examples/",
        )
    ]
