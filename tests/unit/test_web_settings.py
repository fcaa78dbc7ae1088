"""The upload page's configuration (web.conf), password hashes and host check."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from abflasher import errors
from abflasher.web.security import Guard
from abflasher.web.settings import WebConfig, hash_password, load_web_config, parse_web_config, verify_password

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "debian" / "web.conf"


def test_password_hashes_verify_only_their_password() -> None:
    stored = hash_password("correct horse")
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_password("correct horse", stored)
    assert not verify_password("correct hors", stored)
    assert not verify_password("", stored)
    assert hash_password("correct horse") != stored, "a fresh salt each time"
    assert not verify_password("correct horse", "")
    assert not verify_password("correct horse", "scrypt$3$8$1$AAAA$AAAA")  # N not a power of two


def test_the_shipped_file_sets_nothing_and_lists_every_option_with_its_default() -> None:
    text = SHIPPED.read_text()
    assert parse_web_config(text) == WebConfig()
    listed = re.findall(r"(?m)^#(\w+) =", text)
    assert sorted(listed) == sorted(WebConfig.__dataclass_fields__)
    uncommented = re.sub(r"(?m)^#(\w+ =)", r"\1", text)
    assert parse_web_config(uncommented) == WebConfig(), "the value shown for each option is its default"


def test_defaults_serve_only_in_update_mode_with_a_login() -> None:
    config = load_web_config("/nonexistent/web.conf")
    assert config.enabled == "auto"
    assert config.login_required is True
    assert config.password_hash == ""
    assert (config.listen_address, config.port, config.tls) == ("0.0.0.0", 80, False)


def test_options_are_read() -> None:
    stored = hash_password("x")
    config = parse_web_config(
        f"[web]\nenabled = yes\nport = 8443\ntls_certificate = /c.pem\ntls_key = /k.pem\npassword_hash = {stored}\n"
        "login-required = no\nallowed_hosts = Robot.example.net  other\nsession_lifetime = 60\n")
    assert config == WebConfig(enabled="yes", port=8443, tls_certificate="/c.pem", tls_key="/k.pem",
                               password_hash=stored, login_required=False,
                               allowed_hosts=("robot.example.net", "other"), session_lifetime=60.0)
    assert config.tls


@pytest.mark.parametrize(("text", "message"), [
    ("enabled = maybe", "use auto, yes or no"),
    ("port = 0", "use a port number"),
    ("port = http", "use a port number"),
    ("login_required = perhaps", "use yes or no"),
    ("session_lifetime = long", "use a number of seconds"),
    ("tls_certificate = /c.pem", "tls_certificate and tls_key go together"),
    ("password_hash = hunter2", "not a hash made by ab-flasher-web --hash-password"),
    ("colour = blue", "colour: unknown option"),
])
def test_bad_options_are_refused_with_what_to_do(text: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=re.escape(message)):
        parse_web_config(f"[web]\n{text}\n", source="web.conf")


@pytest.mark.parametrize(("host", "allowed"), [
    ("192.168.7.2", True),
    ("192.168.7.2:8080", True),
    ("[fe80::1]:80", True),
    ("[::1]", True),
    ("localhost:80", True),
    (socket.gethostname(), True),
    (f"{socket.gethostname()}.local", True),
    ("robot.example.net", True),
    ("ROBOT.example.net.", True),
    ("evil.example", False),
    ("evil.example:80", False),
    ("192.168.7.2.evil.example", False),
    ("", False),
])
def test_the_page_answers_only_to_its_own_names(host: str, allowed: bool) -> None:
    guard = Guard(WebConfig(allowed_hosts=("robot.example.net",)))
    assert guard.host_allowed(host) is allowed


def test_the_boot_time_check_does_not_load_the_web_server() -> None:
    """`ab-flasher-web --check-enabled` runs on every boot (the unit's ExecCondition): aiohttp is loaded only to
    serve, since importing it cost seconds of a Pi-class boot."""
    probe = ("import sys, abflasher.web.main; "
             "print(sorted(m for m in ('aiohttp', 'abflasher.web.app') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"
