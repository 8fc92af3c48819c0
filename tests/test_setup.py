"""Setting the gateway up: packaging metadata, the Makefile's venv handling, the README's install
steps and the command's ``--help``.

The Makefile tests run the real ``make`` on a copy of the Makefile in a temporary directory,
with stand-ins for what would need the network or another Python: a venv made with
``--without-pip`` (plus an empty ``pip`` package where the test needs a complete one), a fake
``edge-gateway`` in it, and fake interpreters that report another Python version. Nothing is
installed, so each ``make`` call takes a fraction of a second.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.licenses import canonicalize_license_expression
from packaging.version import Version

from gateway.config import EX_CONFIG
from gateway.core.component import StartupError

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 30.0
THIS_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
# What the fake interpreters report: any version but this one.
OTHER_PYTHON = (sys.version_info[0], sys.version_info[1] + 1)
OTHER_VERSION = f"{OTHER_PYTHON[0]}.{OTHER_PYTHON[1]}"
# What the Makefile copy needs: the recipes, and the stamp's prerequisites.
MAKE_FILES = ("Makefile", "pyproject.toml", "constraints.txt")
# Inherited from a `make test` that runs these tests, they would change the inner make.
MAKE_VARS = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTHON")

# Run by the real interpreter, answers `-c CODE` as if it were another version: the Makefile
# learns versions only from sys.version_info. With VENV_FAILS, `-m venv DIR` does what
# `python3 -m venv` does on Debian without python3-venv: it leaves a venv without pip behind
# and fails.
FAKE_PYTHON_BODY = """
import os
import sys

sys.version_info = (*VERSION, 0, "final", 0)
sys.version = "%d.%d.0 (fake)" % VERSION
args = sys.argv[1:]
if args[:1] == ["-c"]:
    sys.argv = ["-c", *args[2:]]
    exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
elif args[:2] == ["-m", "venv"] and VENV_FAILS:
    os.makedirs(os.path.join(args[2], "bin"))
    open(os.path.join(args[2], "pyvenv.cfg"), "w").close()
    sys.exit("The virtual environment was not created successfully because ensurepip is not available.")
else:
    sys.exit("fake python: cannot run %r" % (args,))
"""


def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# ---- pyproject.toml ----------------------------------------------------------------------------


def test_license_is_an_spdx_expression() -> None:
    project = pyproject()["project"]
    assert isinstance(project, dict)
    # The PEP 639 string, not the deprecated {text = ...} table setuptools warns about.
    assert project["license"] == "Apache-2.0"
    assert canonicalize_license_expression(project["license"]) == project["license"]
    # PEP 639 forbids license classifiers next to a license expression.
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]


def test_build_backend_is_pinned_to_a_setuptools_that_reads_spdx_licenses() -> None:
    build = pyproject()["build-system"]
    assert isinstance(build, dict)
    assert build["build-backend"] == "setuptools.build_meta"
    [requirement] = build["requires"]
    name, _, version = requirement.partition("==")
    assert name == "setuptools", f"{requirement!r} is not an exact pin"
    assert Version(version) >= Version("77"), "setuptools < 77 rejects a license string"


# ---- Makefile: the venv ------------------------------------------------------------------------


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    if shutil.which("make") is None:
        pytest.skip("make is not on PATH")
    root = tmp_path / "checkout"
    root.mkdir()
    for name in MAKE_FILES:
        shutil.copy(ROOT / name, root / name)
        # Older than any stamp a test writes, so that only a missing stamp triggers an install.
        os.utime(root / name, (1_000_000_000, 1_000_000_000))
    return root


def run_make(
    checkout: Path, *args: str, env: dict[str, str] | None = None, path: Path | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k not in MAKE_VARS}
    if path is not None:
        environ["PATH"] = f"{path}{os.pathsep}{environ['PATH']}"
    environ.update(env or {})
    return subprocess.run(
        ["make", "--no-print-directory", *args],
        cwd=checkout,
        env=environ,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def make_venv(checkout: Path, *, pip: bool) -> Path:
    """A real venv of this Python, with a stand-in ``edge-gateway`` and, if ``pip``, an
    importable (empty) pip and an up-to-date stamp: what ``make`` leaves after a good install."""
    venv = checkout / ".venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=TIMEOUT
    )
    script = venv / "bin" / "edge-gateway"
    script.write_text('#!/bin/sh\necho "fake edge-gateway: $*"\n')
    script.chmod(0o755)
    if pip:
        [site] = venv.glob("lib/python3.*/site-packages")
        (site / "pip").mkdir()
        (site / "pip" / "__init__.py").touch()
        (venv / ".installed-stamp").touch()
    return venv


def fake_python(path: Path, version: tuple[int, int], *, venv_fails: bool = False) -> Path:
    header = f"#!{sys.executable}\nVERSION = {version!r}\nVENV_FAILS = {venv_fails!r}\n"
    path.write_text(header + FAKE_PYTHON_BODY)
    path.chmod(0o755)
    return path


def assert_stopped_before_install(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode != 0, result.stdout
    assert "pip install" not in result.stdout
    assert "fake edge-gateway" not in result.stdout


def test_complete_venv_is_used_as_it_is(checkout: Path) -> None:
    make_venv(checkout, pip=True)
    result = run_make(checkout, "demo")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "fake edge-gateway: demo"
    assert "pip install" not in result.stdout


def test_explicit_python_of_the_venvs_version_is_accepted(checkout: Path) -> None:
    make_venv(checkout, pip=True)
    result = run_make(checkout, f"PYTHON={sys.executable}", "demo")
    assert result.returncode == 0, result.stderr
    assert "fake edge-gateway: demo" in result.stdout


def test_venv_without_pip_stops_make_with_a_hint(checkout: Path) -> None:
    make_venv(checkout, pip=False)  # e.g. `python -m venv --without-pip .venv`
    result = run_make(checkout, "demo")
    assert_stopped_before_install(result)
    assert "error: .venv is incomplete or broken: it has no pip" in result.stderr
    assert "'make clean', then run 'make demo' again" in result.stderr


def test_venv_whose_python_is_gone_stops_make_with_a_hint(checkout: Path, tmp_path: Path) -> None:
    # A venv is symlinks to the interpreter it was made with; here that one was removed.
    gone = tmp_path / "removed-python"
    venv = checkout / ".venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text(f"home = {gone}\ninclude-system-site-packages = false\n")
    (venv / "bin" / "python").symlink_to(gone / "python3")
    (venv / ".installed-stamp").touch()
    result = run_make(checkout, "test")
    assert_stopped_before_install(result)
    assert "its python does not start" in result.stderr
    assert str(gone) in result.stderr
    assert "'make clean', then run 'make test' again" in result.stderr


def test_venv_without_pyvenv_cfg_stops_make_with_a_hint(checkout: Path) -> None:
    (checkout / ".venv" / "bin").mkdir(parents=True)
    result = run_make(checkout)
    assert_stopped_before_install(result)
    assert "it has no pyvenv.cfg" in result.stderr
    assert "'make clean', then run 'make venv' again" in result.stderr


def test_clean_removes_a_broken_venv(checkout: Path) -> None:
    make_venv(checkout, pip=False)
    result = run_make(checkout, "clean")
    assert result.returncode == 0, result.stderr
    assert not (checkout / ".venv").exists()


@pytest.mark.parametrize("given_as", ["argument", "environment"])
def test_python_of_another_version_is_refused(
    checkout: Path, tmp_path: Path, given_as: str
) -> None:
    make_venv(checkout, pip=True)
    other = fake_python(tmp_path / "python-other", OTHER_PYTHON)
    if given_as == "argument":
        result = run_make(checkout, f"PYTHON={other}", "demo")
    else:
        result = run_make(checkout, "demo", env={"PYTHON": str(other)})
    assert_stopped_before_install(result)
    assert (
        f"error: .venv was made with Python {THIS_PYTHON}, "
        f"but PYTHON={other} is Python {OTHER_VERSION}."
    ) in result.stderr
    assert f"make clean && make PYTHON={other} demo" in result.stderr


def test_default_python_is_not_compared_with_the_venv(checkout: Path, tmp_path: Path) -> None:
    # The venv's Python was chosen when it was made; a plain `make demo` keeps using it even
    # if `python3` on PATH is now another version.
    make_venv(checkout, pip=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_python(bin_dir / "python3", OTHER_PYTHON)
    result = run_make(checkout, "demo", path=bin_dir)
    assert result.returncode == 0, result.stderr
    assert "fake edge-gateway: demo" in result.stdout


def test_python_that_does_not_run_is_reported(checkout: Path, tmp_path: Path) -> None:
    make_venv(checkout, pip=True)
    result = run_make(checkout, f"PYTHON={tmp_path / 'python3.99'}", "demo")
    assert_stopped_before_install(result)
    assert f"error: PYTHON={tmp_path / 'python3.99'} does not run" in result.stderr


def test_too_old_python_makes_no_venv(checkout: Path, tmp_path: Path) -> None:
    old = fake_python(tmp_path / "python-old", (3, 10))
    result = run_make(checkout, f"PYTHON={old}", "demo")
    assert_stopped_before_install(result)
    assert "edge-gateway needs Python >= 3.11 (found 3.10.0)" in result.stderr
    assert not (checkout / ".venv").exists()


def test_failed_venv_creation_leaves_no_half_made_venv(checkout: Path, tmp_path: Path) -> None:
    broken = fake_python(tmp_path / "python-no-ensurepip", (3, 11), venv_fails=True)
    result = run_make(checkout, f"PYTHON={broken}", "demo")
    assert_stopped_before_install(result)
    assert "ensurepip is not available" in result.stderr
    assert "sudo apt install python3-venv" in result.stderr
    assert not (checkout / ".venv").exists()


# ---- README: install steps ---------------------------------------------------------------------


def readme_commands() -> list[tuple[int, str]]:
    """Every command line in the README's code blocks, with its line number (``$ `` prompts
    removed)."""
    commands: list[tuple[int, str]] = []
    fenced = False
    for number, line in enumerate((ROOT / "README.md").read_text().splitlines()):
        if line.startswith("```"):
            fenced = not fenced
        elif fenced:
            commands.append((number, line.removeprefix("$ ").strip()))
    return commands


def unit_program() -> Path:
    unit = (ROOT / "systemd" / "edge-gateway.service").read_text()
    [exec_start] = re.findall(r"^ExecStart=(\S+)", unit, re.MULTILINE)
    return Path(exec_start)


def test_readme_install_links_the_units_program_onto_path() -> None:
    program = unit_program()
    commands = [command for _, command in readme_commands()]
    venv = program.parent.parent
    assert f"sudo python3 -m venv {venv}" in commands
    assert f"sudo {venv}/bin/pip install -c constraints.txt ." in commands
    assert f"sudo ln -sf {program} /usr/local/bin/edge-gateway" in commands


def test_readme_calls_edge_gateway_bare_only_after_linking_it() -> None:
    commands = readme_commands()
    [link] = [n for n, command in commands if command.startswith("sudo ln -sf ")]
    bare = [n for n, command in commands if re.match(r"(sudo )?edge-gateway\b", command)]
    assert bare, "nothing checked"
    assert min(bare) > link


def test_readme_quick_start_runs_the_checkouts_command() -> None:
    text = (ROOT / "README.md").read_text()
    quick_start = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert "make demo" in quick_start
    assert re.search(r"^\.venv/bin/edge-gateway ", quick_start, re.MULTILINE)


def test_readme_installs_the_makefiles_pip() -> None:
    [pip_version] = re.findall(
        r"^PIP_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE
    )
    program = unit_program()
    commands = [command for _, command in readme_commands()]
    assert f'sudo {program.parent}/pip install "pip=={pip_version}"' in commands


# ---- the command's --help ----------------------------------------------------------------------


def help_text(*command: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", *command, "--help"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "COLUMNS": "80"},
    )
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stdout.splitlines() if len(line) > 80]
    return result.stdout


def test_help_says_what_the_gateway_does_today() -> None:
    text = help_text()
    description = " ".join(text.split("\n\n")[1:3]).replace("\n", " ")
    for today in (
        "Modbus RTU",
        "Modbus TCP",
        "serial-line",
        "in-memory hub",
        "supervisor",
        "secure WebSocket (wss)",
        "SAP Cloud Integration (CPI)",
        "outbox",
    ):
        assert today in description
    assert "systemd" in description
    for today in ("HTTPS API", "Modbus writes", "/readyz", "/metrics", "status page"):
        assert today in " ".join(text.split("\n\n")[1:4]).replace("\n", " ")
    assert "not there yet" not in text
    for command in (
        "run", "check-config", "demo", "hash-token", "tail", "send-command", "hash-password",
        "outbox",
    ):  # fmt: skip
        assert re.search(rf"^    {command}\b", text, re.MULTILINE)


EXIT_STATUSES = {
    "run": {0, EX_CONFIG, StartupError.EX_UNAVAILABLE, 130},
    "check-config": {0, EX_CONFIG},
    "demo": {0, StartupError.EX_UNAVAILABLE, 130},
}


@pytest.mark.parametrize("command", list(EXIT_STATUSES))
def test_command_help_has_description_exit_statuses_and_example(command: str) -> None:
    text = help_text(command)
    usage, description, *_ = text.split("\n\n")
    assert usage.startswith(f"usage: edge-gateway {command} ")
    assert len(description.split()) > 20, description
    statuses = text.split("\nexit status:\n", 1)[1].split("\n\n", 1)[0]
    listed = {int(status) for status in re.findall(r"^  (\d+) ", statuses, re.MULTILINE)}
    assert listed == EXIT_STATUSES[command]
    examples = re.split(r"\nexamples?:\n", text, maxsplit=1)[1].split("\n\n", 1)[0]
    assert f"  edge-gateway {command}" in examples
