"""The systemd units: ``systemd-analyze verify`` finds nothing to say, and the settings the
daemon relies on are there.

CI needs systemd-analyze: ``apt-get update && apt-get install -y --no-install-recommends
systemd`` (Debian/Ubuntu). Without it the verification is skipped, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from photowatch.core.config import Daemon

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"
UNITS = ("photowatch.service", "photowatch-finalize.service", "photowatch-finalize.timer")
INSTALLED = "/opt/photowatch/bin/photowatch"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as section → key → values (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(unit: dict, section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= missing"
    return values[-1]


def seconds(text: str) -> float:
    units = {"s": 1, "min": 60, "h": 3600}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not found: install it with "
                    "'apt-get install -y --no-install-recommends systemd'")
    # the units name the installed executable; point them at one that exists here
    exe = Path(sys.executable).with_name("photowatch")
    exe = exe if exe.exists() else Path(shutil.which("true") or "/bin/true")
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED, str(exe)))
    result = subprocess.run([analyze, "verify", "--man=no", *(f"./{n}" for n in UNITS)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, f"systemd-analyze verify:\n{output}"


def test_daemon_unit_settings():
    unit = parse_unit(SYSTEMD / "photowatch.service")
    service = unit["Service"]
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "KillMode") == "mixed"
    assert one(unit, "Service", "ExecStart") == (
        f"{INSTALLED} watch --config /etc/photowatch/config.toml")
    assert one(unit, "Service", "User") == one(unit, "Service", "Group") == "photowatch"
    # stopping: the daemon's own limit comes first, then systemd's SIGKILL
    assert seconds(one(unit, "Service", "TimeoutStopSec")) > Daemon().stop_timeout_s
    # the watchdog: pings every second at most; a frame may take up to WatchdogSec/2
    assert seconds(one(unit, "Service", "WatchdogSec")) >= 120
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "ProtectHome": "yes",
                       "ProtectKernelTunables": "yes", "ProtectControlGroups": "yes",
                       "RestrictSUIDSGID": "yes", "LockPersonality": "yes"}.items():
        assert one(unit, "Service", key) == value, key
    assert service["ReadWritePaths"] == ["/var/lib/photowatch"]
    assert service["ReadOnlyPaths"] == ["/data/camera"]
    assert "AF_UNIX" in one(unit, "Service", "RestrictAddressFamilies")  # NOTIFY_SOCKET


def test_finalize_units():
    service = parse_unit(SYSTEMD / "photowatch-finalize.service")
    assert one(service, "Service", "Type") == "oneshot"
    assert one(service, "Service", "ExecStart") == (
        f"{INSTALLED} finalize --config /etc/photowatch/config.toml")
    assert one(service, "Service", "User") == "photowatch"
    timer = parse_unit(SYSTEMD / "photowatch-finalize.timer")
    assert one(timer, "Timer", "Persistent") == "true"
    assert one(timer, "Timer", "OnCalendar").startswith("*-*-* ")
    assert one(timer, "Timer", "Unit") == "photowatch-finalize.service"
    assert one(timer, "Install", "WantedBy") == "timers.target"


def test_readme_installs_every_unit():
    readme = (SYSTEMD / "README.md").read_text()
    for name in UNITS:
        assert name in readme
    assert "useradd" in readme and "systemctl enable" in readme


# ------------------------------------------------------------------------------ sd_notify
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_sends_to_the_socket(tmp_path, monkeypatch, abstract):
    import socket
    import uuid

    from photowatch.run import sdnotify

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"photowatch-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    else:
        sock.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    sock.settimeout(10)
    try:
        assert sdnotify.notify("READY=1", sdnotify.status_line("3 queued,\n2 done"))
        assert sock.recv(4096).decode() == "READY=1\nSTATUS=3 queued, 2 done"
    finally:
        sock.close()


def test_sd_notify_outside_systemd(tmp_path, monkeypatch):
    from photowatch.run import sdnotify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert sdnotify.notify("READY=1") is False  # never raises


def test_watchdog_interval(monkeypatch):
    import os

    from photowatch.run import sdnotify

    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert sdnotify.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_USEC", "600000000")
    assert sdnotify.watchdog_interval_s() == 600.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval_s() == 600.0
    monkeypatch.setenv("WATCHDOG_PID", "1" if os.getpid() != 1 else "2")
    assert sdnotify.watchdog_interval_s() is None


def test_sd_notify_never_blocks(monkeypatch):
    """Nobody reads the socket: once its queue is full, notifications are dropped at once."""
    import socket
    import uuid

    from photowatch.run import sdnotify

    name = f"photowatch-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        sent = [sdnotify.notify("WATCHDOG=1") for _ in range(5000)]  # would hang if blocking
        assert sent[0] and not sent[-1]
    finally:
        sock.close()
