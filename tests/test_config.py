"""Config: the shipped default validates; bad input names file, key, value and what is valid."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, get_args, get_origin

import pytest

from probe.cli import main
from probe.config import default_config_path, load_config, parse_config
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
    for needle in (
        'kind = "socks5"',
        'kind = "http"',
        'kind = "bind"',
        "shadowsocks",
        "v2ray",
        "tor",
        "wireguard",
        "openvpn",
        'interface = "tun0"',
        'transport = "udp"',
    ):
        assert needle in text, needle


BAD = [
    ('kind = "direct"', 'kind = "vpn"', "paths[0].kind", "'direct', 'socks5', 'http' or 'bind'", "'vpn'"),
    ('url = "https://www.example.test/"', 'url = "ftp://x/"', "targets[0]", "http:// or https://", "ftp://x/"),
    ('name = "t"', 'name = "Bad Name"', "targets[0].name", "pattern", "Bad Name"),
    ('kind = "direct"', 'kind = "socks5"', "paths[0]", "needs host and port", ""),
    ('group = "blocked"', "group = 7", "targets[0].group", "string", "7"),
    ('kind = "direct"', 'kind = "direct"\nresolver = ["not-an-ip"]', "paths[0].resolver", "IP address", "not-an-ip"),
    ('kind = "direct"', 'kind = "direct"\nport_typo = 1', "paths[0].port_typo",
     "unknown key (did you mean port?); the keys of paths[0] are name, kind, label, host, port,", ""),
]  # fmt: skip


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


UNKNOWN_KEYS = [  # a key no table has: (added to MINIMAL, its path, what the message offers)
    ("[probe]\nintervl_s = 300", "probe.intervl_s", "(did you mean interval_s?); the keys of probe are interval_s, "),
    ("[store]\nkeep_days = 3", "store.keep_days", "(did you mean keep_raw_days?); the keys of store are path, keep_raw_days"),
    ('[[paths]]\nname = "p"\nkind = "socks5"\nhost = "h"\nport = 1\nendpoint = { host = "e", port = 2, transprot = "tcp" }',
     "paths[1].endpoint.transprot", "(did you mean transport?); the keys of paths[1].endpoint are host, port, transport"),
    ("verbose = true", "verbose", "unknown key; the top-level keys are vantage, store, probe, daemon, metrics, analysis, report"),
]  # fmt: skip


@pytest.mark.parametrize(("added", "key", "valid"), UNKNOWN_KEYS, ids=[k[1] for k in UNKNOWN_KEYS])
def test_an_unknown_key_is_named_with_the_valid_keys_of_its_table(added: str, key: str, valid: str) -> None:
    text = MINIMAL.replace("[vantage]", added + "\n[vantage]") if added.startswith("verbose") else MINIMAL + added
    with pytest.raises(ConfigError) as refused:
        parse_config(text, "typo.toml")
    assert f"typo.toml: invalid configuration:\n  {key}: unknown key" in str(refused.value)
    assert valid in str(refused.value) and "Extra inputs" not in str(refused.value)


def test_a_misspelt_secret_key_is_not_echoed() -> None:
    with pytest.raises(ConfigError, match=r"paths\[0\]\.passwd: unknown key \(did you mean password\?\)") as refused:
        parse_config(MINIMAL + 'passwd = "hunter2"\n', "typo.toml")
    assert "hunter2" not in str(refused.value)


def test_bad_secret_value_is_not_echoed(tmp_path: Path) -> None:
    path = tmp_path / "secret.toml"
    path.write_text(MINIMAL + SECRET_PATH.replace('"${TW_TEST_PASSWORD}"', "12345"))
    env = {"TW_TEST_USER": "alice", "PATH": "/usr/bin:/bin"}
    result = cli("config", "check", "--config", str(path), env=env)
    assert result.returncode == 2 and "paths[1].password" in result.stderr
    assert "12345" not in result.stderr


# Configs that passed `config check` and then crashed the daemon (a traceback, exit 1), left it
# running with every round failing inside APScheduler, or stored a failure every round.
# (replace in MINIMAL or add, key, the bad value as shown, the valid range or what is valid)
REFUSED = [
    ("[probe]\ninterval_s = 1e308", "probe.interval_s", "1e+308", "from 0.1 to 86400 (seconds)"),
    ("[probe]\ninterval_s = inf", "probe.interval_s", "inf", "from 0.1 to 86400 (seconds)"),
    ("[probe]\ninterval_s = nan", "probe.interval_s", "nan", "from 0.1 to 86400 (seconds)"),
    ("[probe]\ngroup_intervals_s = { blocked = 1e308 }", "probe.group_intervals_s.blocked", "1e+308", "0.1 to 86400"),
    ("[daemon]\ncompact_every_s = 1e308", "daemon.compact_every_s", "1e+308", "from 1 to 86400 (seconds)"),
    ("[daemon]\nmisfire_grace_s = 1e308", "daemon.misfire_grace_s", "1e+308", "from 1 to 86400 (seconds)"),
    ('[store]\npath = ""', "store.path", "''", "must name the store's file"),
    ('[store]\npath = "/"', "store.path", "'/'", "must name the store's file"),
    ('[probe]\nca_file = "{tmp}/missing.pem"', "probe.ca_file", "missing.pem", "No such file"),
    ('[probe]\nca_file = "{tmp}/not-pem.txt"', "probe.ca_file", "not-pem.txt", "holds no PEM certificate"),
    ('url = "https://www.example.test:99999/"', "targets[0]", ":99999/", "port must be a number from 1 to 65535"),
    ('[store]\nurl = "postgresql://tw@db.example:99999/tw"', "store.url", ":99999/tw", "from 1 to 65535"),
    ('url = "https://www.example.test/\\r\\nX-Injected: 1"', "targets[0].url", "\\r\\nX-Injected", "control character"),
    ('url = "https://www.example.test/a b"', "targets[0].url", "a b", "whitespace"),
]


def _with(change: str, tmp: Path) -> str:
    change = change.replace("{tmp}", str(tmp))
    if change.startswith("url = "):
        return MINIMAL.replace('url = "https://www.example.test/"', change)
    return MINIMAL + change + "\n"


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str] | None]:
    """`tunnelwatch run` on every config of REFUSED, a few at once (each is a Python start);
    None where the daemon took the config and ran on."""
    tmp = tmp_path_factory.mktemp("refused")
    (tmp / "not-pem.txt").write_text("not a certificate\n")

    def run(change: str) -> subprocess.CompletedProcess[str] | None:
        config = tmp / f"{abs(hash(change))}.toml"
        config.write_text(_with(change, tmp))
        try:
            return subprocess.run(
                [*TUNNELWATCH, "run", "--config", str(config)], cwd=tmp, capture_output=True, text=True, timeout=90
            )
        except subprocess.TimeoutExpired:
            return None

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip([r[0] for r in REFUSED], pool.map(run, [r[0] for r in REFUSED]), strict=True))


@pytest.fixture
def in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str]]]:
    """`tunnelwatch ARGS...` run by its own main() in this process: the exit code and stderr.
    main() sets up logging; the root logger is put back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def call(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        return int(exited.value.code or 0), capsys.readouterr().err

    yield call
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize(("change", "key", "value", "valid"), REFUSED, ids=[r[1] + "=" + r[2] for r in REFUSED])
def test_a_config_the_daemon_cannot_run_is_refused_at_load(
    refused: dict[str, subprocess.CompletedProcess[str] | None],
    in_process: Callable[..., tuple[int, str]],
    tmp_path: Path,
    change: str,
    key: str,
    value: str,
    valid: str,
) -> None:
    (tmp_path / "not-pem.txt").write_text("not a certificate\n")
    config = tmp_path / "bad.toml"
    config.write_text(_with(change, tmp_path))
    checked = in_process("config", "check", "--config", str(config))
    ran = refused[change]
    assert ran is not None, "tunnelwatch run took the config and ran on"
    for code, stderr in (checked, (ran.returncode, ran.stderr)):
        assert code == 2, stderr
        message = " ".join(stderr.split())
        assert key in message and value in message and valid in message, message
        assert "Traceback" not in stderr


def _numeric_keys() -> list[tuple[str, str]]:
    """Every number a config section holds: (section, key)."""
    from probe.config import AnalysisSettings, DaemonSettings, ProbeSettings, ReportSettings, StoreSettings

    sections = {
        "store": StoreSettings,
        "probe": ProbeSettings,
        "daemon": DaemonSettings,
        "analysis": AnalysisSettings,
        "report": ReportSettings,
    }
    keys = []
    for section, model in sections.items():
        for name, field in model.model_fields.items():
            kind = field.annotation
            if get_origin(kind) is dict:  # group_intervals_s: a number per group
                kind = get_args(kind)[1]
            if get_origin(kind) is Annotated:
                kind = get_args(kind)[0]
            if kind in (int, float):
                keys.append((section, name))
    return keys


NUMERIC_KEYS = _numeric_keys()


@pytest.mark.parametrize(("section", "key"), NUMERIC_KEYS, ids=[f"{s}.{k}" for s, k in NUMERIC_KEYS])
@pytest.mark.parametrize("bad", ["1e308", "inf", "nan", "-1", "true", '"5"'])
def test_every_number_in_the_config_is_bounded(section: str, key: str, bad: str) -> None:
    value = f"{{ blocked = {bad} }}" if key == "group_intervals_s" else bad
    shown = f"{section}.{key}.blocked" if key == "group_intervals_s" else f"{section}.{key}"
    with pytest.raises(ConfigError) as caught:
        parse_config(f"{MINIMAL}[{section}]\n{key} = {value}\n", "x.toml")
    valid = r": must be a (whole )?number (from|over) [\d.]+ (up )?to \d+"
    assert re.search(re.escape(shown) + valid, str(caught.value)), caught.value


@pytest.mark.parametrize(("old", "new", "key"), [
    ('url = "https://www.example.test/"', 'url = "https://www.example.test/"\ntimeout_s = inf', "targets[0].timeout_s"),
    ('kind = "direct"', 'kind = "socks5"\nhost = "127.0.0.1"\nport = 1e308', "paths[0].port"),
    ('kind = "direct"', 'kind = "direct"\nendpoint = { host = "h", port = 70000 }', "paths[0].endpoint.port"),
    ('kind = "direct"', 'kind = "socks5"\nhost = "proxy\\r\\n"\nport = 1080', "paths[0].host"),
])  # fmt: skip
def test_the_numbers_and_hosts_of_targets_and_paths_are_checked(old: str, new: str, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_config(MINIMAL.replace(old, new, 1), "x.toml")


def test_the_valid_edges_of_a_range_are_taken() -> None:
    edges = "[probe]\ninterval_s = 0.1\ntimeout_s = 600\n[daemon]\ndrain_timeout_s = 0\n"
    cfg = parse_config(MINIMAL + edges, "x.toml")
    assert (cfg.probe.interval_s, cfg.probe.timeout_s, cfg.daemon.drain_timeout_s) == (0.1, 600, 0)


def test_a_pattern_in_a_message_is_printed_whole(tmp_path: Path) -> None:
    """Rich read `[a-z0-9]` in the slug pattern as markup and printed `'^*$'`."""
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL.replace('name = "t"', 'name = "Bad Name"', 1))
    result = cli("config", "check", "--config", str(path))
    assert result.returncode == 2
    assert "should match pattern '^[a-z0-9][a-z0-9._-]*$'" in result.stderr, result.stderr
