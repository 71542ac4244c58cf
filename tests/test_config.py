"""Config: the shipped default validates; bad input names file, key, value and what is valid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from probe.config import default_config_path, load_config
from probe.errors import ConfigError

TUNNELWATCH = [sys.executable, "-m", "probe"]

MINIMAL = """
[vantage]
name = "v"
[[targets]]
name = "t"
group = "blocked"
kind = "http"
url = "https://www.example.test/"
[[paths]]
name = "direct"
kind = "direct"
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TUNNELWATCH, *args], capture_output=True, text=True, env=env, timeout=60)


def test_shipped_default_has_the_blocked_and_control_sites() -> None:
    cfg = load_config(default_config_path())
    hosts = {t.group: set() for t in cfg.targets}
    for t in cfg.targets:
        hosts[t.group].add((t.url or "").split("/")[2])
    assert hosts["blocked"] == {
        "www.google.com", "www.facebook.com", "twitter.com", "www.reuters.com", "www.bloomberg.com", "www.nytimes.com"
    }  # fmt: skip
    assert hosts["control"] == {"www.baidu.com", "www.qq.com", "www.163.com", "www.sina.com.cn"}
    assert [p.name for p in cfg.paths] == ["direct"]


def test_shipped_default_documents_every_tunnel_kind() -> None:
    text = default_config_path().read_text()
    for needle in ('kind = "socks5"', 'kind = "http"', 'kind = "bind"', "shadowsocks", "v2ray", "tor", "wireguard",
                   "openvpn", 'interface = "tun0"', 'transport = "udp"'):  # fmt: skip
        assert needle in text, needle


BAD = [
    ('kind = "direct"', 'kind = "vpn"', "paths[0].kind", "'direct', 'socks5', 'http' or 'bind'", "'vpn'"),
    ('url = "https://www.example.test/"', 'url = "ftp://x/"', "targets[0]", "http:// or https://", "ftp://x/"),
    ('name = "t"', 'name = "Bad Name"', "targets[0].name", "pattern", "Bad Name"),
    ('kind = "direct"', 'kind = "socks5"', "paths[0]", "needs host and port", ""),
    ('group = "blocked"', "group = 7", "targets[0].group", "string", "7"),
    ('kind = "direct"', 'kind = "direct"\nresolver = ["not-an-ip"]', "paths[0].resolver", "IP address", "not-an-ip"),
    ('kind = "direct"', 'kind = "direct"\nport_typo = 1', "paths[0].port_typo", "Extra inputs", ""),
]


@pytest.mark.parametrize(("old", "new", "key", "valid", "value"), BAD, ids=[b[2] + "-" + b[1][:12] for b in BAD])
def test_bad_config_is_refused_with_exit_2_and_a_clear_message(
    tmp_path: Path, old: str, new: str, key: str, valid: str, value: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL.replace(old, new, 1))
    result = cli("config", "check", "--config", str(path))
    assert result.returncode == 2, result.stderr
    message = " ".join(result.stderr.split())
    assert str(path) in message and key in message and valid in message and value in message, message
    assert "Traceback" not in result.stderr


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    text = MINIMAL + "\n[[targets]\n"
    path.write_text(text)
    line = text.splitlines().index("[[targets]") + 1
    result = cli("probe", "--config", str(path), "--no-store")
    assert result.returncode == 2
    assert str(path) in result.stderr and f"line {line}," in result.stderr and "Traceback" not in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = cli("config", "check", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2 and "no such config file" in result.stderr


def test_duplicate_names_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(MINIMAL + '[[paths]]\nname = "direct"\nkind = "direct"\n')
    with pytest.raises(ConfigError, match="'direct' is used twice"):
        load_config(path)


SECRET_PATH = """
[[paths]]
name = "socks"
kind = "socks5"
host = "127.0.0.1"
port = 1080
username = "${TW_TEST_USER}"
password = "${TW_TEST_PASSWORD}"
"""


def test_secrets_come_from_the_environment_and_are_masked(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(MINIMAL + SECRET_PATH)
    env = {"TW_TEST_USER": "alice", "TW_TEST_PASSWORD": "hunter2-very-secret", "PATH": "/usr/bin:/bin"}
    result = cli("config", "check", "--config", str(path), env=env)
    assert result.returncode == 0, result.stderr
    assert "hunter2-very-secret" not in result.stdout + result.stderr
    assert "alice" not in result.stdout
    shown = json.loads(result.stdout)
    assert shown["paths"][1]["password"] == "********"


def test_secret_reference_to_unset_variable_names_key_and_variable(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(MINIMAL + SECRET_PATH)
    result = cli("config", "check", "--config", str(path), env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "paths[1].username" in result.stderr and "TW_TEST_USER" in result.stderr


def test_bad_secret_value_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(MINIMAL + SECRET_PATH.replace('"${TW_TEST_PASSWORD}"', "12345"))
    env = {"TW_TEST_USER": "alice", "PATH": "/usr/bin:/bin"}
    result = cli("config", "check", "--config", str(path), env=env)
    assert result.returncode == 2 and "paths[1].password" in result.stderr
    assert "12345" not in result.stderr
