"""TOML -> frozen, validated settings. No module-level instance, no side effects."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

SLUG_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN, max_length=64)]
Port = Annotated[int, Field(ge=1, le=65535)]
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Vantage(_Frozen):
    name: Slug
    labels: dict[str, str] = {}


class StoreSettings(_Frozen):
    path: Path = Path("data/tunnelwatch.db")
    keep_raw_days: float = Field(14, ge=1)  # raw rows older than this go once summarised (analysis/rollup.py)
    # Fleet mode: the central PostgreSQL (postgresql://user:${PASSWORD}@host/db); `path` is
    # then the local spool the forwarder uploads from (probe/forwarder.py).
    url: SecretStr | None = None
    forward_every_s: float = Field(10, gt=0, le=3600)
    forward_batch: int = Field(5000, ge=1, le=1_000_000)
    spool_max_rows: int = Field(5_000_000, ge=100)  # the backlog's bound; beyond it the oldest are not uploaded
    uplink: str | None = None  # a path's name: uploads leave through it (probe/uplink.py)

    @field_validator("url")
    @classmethod
    def _postgresql(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and not url.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a PostgreSQL URL: postgresql://user:password@host:port/database")
        return url


class ProbeSettings(_Frozen):
    interval_s: float = Field(300, gt=0)
    group_intervals_s: dict[str, Annotated[float, Field(gt=0)]] = {}
    timeout_s: float = Field(20, gt=0, le=600)
    concurrency: int = Field(32, ge=1, le=1000)
    per_path_concurrency: int = Field(8, ge=1, le=1000)
    ca_file: Path | None = None
    user_agent: str = "tunnelwatch/0.1 (+https://github.com/tunnelwatch/tunnelwatch)"
    body_cap_bytes: int = Field(256 * 1024, ge=1024, le=16 * 1024 * 1024)


class DaemonSettings(_Frozen):
    drain_timeout_s: float = Field(10, ge=0, le=600)
    misfire_grace_s: float = Field(30, gt=0)
    store_buffer: int = Field(100_000, ge=100)
    store_retry_s: float = Field(5, gt=0, le=3600)
    compact_every_s: float = Field(3600, ge=1)  # summarise finished hours, delete raw rows past keep_raw_days


class AnalysisSettings(_Frozen):
    open_after: int = Field(2, ge=1, le=100)  # failing rounds in a row that open an outage
    close_after: int = Field(2, ge=1, le=100)  # good rounds in a row that close it
    degraded_factor: float = Field(3.0, gt=1)  # median latency over its 7-day median that is "degraded"
    degraded_min_ms: float = Field(50, ge=0)  # ... and by at least this much
    events: list[Path] = []  # more event files (TOML or .ics) besides the shipped calendar
    # What to analyse: a SQLite store's path or the fleet's PostgreSQL URL (default: store.path),
    # and which vantage point of a store holding several (the commands' --store, --vantage).
    store: SecretStr | None = None
    vantage: str | None = None
    fleet_quorum: int = Field(2, ge=1)  # vantage points that must agree before the fleet calls an outage


class ReportSettings(_Frozen):
    timezone: str = "Asia/Shanghai"  # charts and weeks are in this time zone
    directory: Path = Path("reports")  # where the daemon writes each week's report
    keep: int = Field(12, ge=1, le=1000)  # reports kept; older ones are deleted
    weekly: bool = True  # the daemon writes last week's report every Monday 00:00

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except (KeyError, ValueError):
            raise ValueError(f"time zone {value!r} is unknown; use an IANA name such as Asia/Shanghai or UTC") from None
        return value


class MetricsSettings(_Frozen):
    enabled: bool = True
    listen: str = "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"listen {value!r} must be host:port, like 127.0.0.1:9464")
        return value

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


def _check_resolver_server(server: str) -> str:
    host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
    host = host or server
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise ValueError(f"resolver server {server!r} must be an IP address, optionally with :port") from None
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"resolver server {server!r} has a bad port; valid ports are 1-65535")
    return server


class Endpoint(_Frozen):
    """Where the tunnel server listens, so its reachability is probed too."""

    host: str = Field(min_length=1)
    port: Port
    transport: Literal["tcp", "udp"] = "tcp"


class PathSpec(_Frozen):
    name: Slug
    kind: Literal["direct", "socks5", "http", "bind"]
    label: str = ""
    host: str | None = None
    port: Port | None = None
    username: SecretStr | None = None
    password: SecretStr | None = None
    remote_dns: bool = True
    address: str | None = None
    interface: str | None = None
    resolver: Literal["system"] | list[str] = "system"
    endpoint: Endpoint | None = None

    @field_validator("resolver")
    @classmethod
    def _servers(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list):
            if not value:
                raise ValueError('give at least one server, or "system"')
            for server in value:
                _check_resolver_server(server)
        return value

    @model_validator(mode="after")
    def _fields_for_kind(self) -> PathSpec:
        if self.kind in ("socks5", "http"):
            if not self.host or self.port is None:
                raise ValueError(f"a {self.kind} path needs host and port")
            if (self.username is None) != (self.password is None):
                raise ValueError("give both username and password, or neither")
        elif self.kind == "bind":
            if bool(self.address) == bool(self.interface):
                raise ValueError("a bind path needs exactly one of address or interface")
            if self.address:
                try:
                    ipaddress.ip_address(self.address)
                except ValueError:
                    raise ValueError(f"address {self.address!r} is not an IP address") from None
        if self.kind != "bind" and (self.address or self.interface):
            raise ValueError(f"address and interface are for bind paths, not {self.kind}")
        if self.kind in ("direct", "bind") and (self.host or self.port or self.username):
            raise ValueError(f"host, port and credentials are for proxy paths, not {self.kind}")
        return self

    @property
    def is_tunnel(self) -> bool:
        return self.kind != "direct"


class Target(_Frozen):
    name: Slug
    group: Slug
    kind: Literal["http", "tls", "tcp", "dns"]
    url: str | None = None
    host: str | None = None
    port: Port | None = None
    sni: str | None = None
    qtypes: list[Literal["A", "AAAA"]] = ["A", "AAAA"]
    expect_title: str | None = None
    expect_body: str | None = None
    timeout_s: float | None = Field(None, gt=0, le=600)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Target:
        if self.kind == "http":
            if not self.url:
                raise ValueError("an http target needs url")
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url {self.url!r} must be an http:// or https:// URL with a host")
            if self.host or self.port:
                raise ValueError("an http target takes url, not host and port")
        else:
            if self.url:
                raise ValueError(f"a {self.kind} target takes host, not url")
            if not self.host:
                raise ValueError(f"a {self.kind} target needs host")
            if self.kind in ("tls", "tcp") and self.port is None:
                raise ValueError(f"a {self.kind} target needs port")
        if self.kind != "http" and (self.expect_title or self.expect_body):
            raise ValueError("expect_title and expect_body are for http targets")
        return self

    @property
    def input(self) -> str:
        """What was measured, as OONI's `input`."""
        if self.kind == "http":
            return self.url or ""
        if self.kind == "dns":
            return self.host or ""
        return f"{self.host}:{self.port}"


class Config(_Frozen):
    vantage: Vantage
    store: StoreSettings = StoreSettings()
    probe: ProbeSettings = ProbeSettings()
    daemon: DaemonSettings = DaemonSettings()
    metrics: MetricsSettings = MetricsSettings()
    analysis: AnalysisSettings = AnalysisSettings()
    report: ReportSettings = ReportSettings()
    targets: list[Target] = Field(min_length=1)
    paths: list[PathSpec] = Field(min_length=1)
    source: str = Field("", exclude=True)
    sha256: str = Field("", exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> Config:
        for key, items in (("targets", self.targets), ("paths", self.paths)):
            seen: set[str] = set()
            for item in items:
                if item.name in seen:
                    raise ValueError(f"{key}: name {item.name!r} is used twice; names must be unique")
                seen.add(item.name)
        names = [p.name for p in self.paths]
        if self.store.uplink is not None and self.store.uplink not in names:
            raise ValueError(f"store.uplink: {self.store.uplink!r} is not a path; use one of {', '.join(names)}")
        if self.store.uplink is not None and self.store.url is None:
            raise ValueError("store.uplink: set store.url too; the uplink carries uploads to the central store")
        return self

    def interval_s(self, group: str) -> float:
        return self.probe.group_intervals_s.get(group, self.probe.interval_s)

    def target(self, name: str) -> Target:
        return next(t for t in self.targets if t.name == name)

    def path(self, name: str) -> PathSpec:
        return next(p for p in self.paths if p.name == name)


def default_config_path() -> Path:
    return Path(str(resources.files("tunnelwatch_config").joinpath("tunnelwatch.toml")))


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("function-after",) and not str(part).startswith(("literal[", "list[")):
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _substitute_env(value: Any, where: str, source: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute_env(v, f"{where}.{k}" if where else k, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if isinstance(value, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(
                    f"{source}: {where}: environment variable {name} is not set "
                    f"(the value refers to ${{{name}}}; export it or write the value in the file)"
                )
            return os.environ[name]

        return ENV_REF.sub(lookup, value)
    return value


def _describe(error: dict[str, Any]) -> str:
    value = error.get("input")
    shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
    msg = error["msg"].removeprefix("Value error, ")
    return f"{_key_path(error['loc'])}: {msg}{shown}"


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    credentials, _, host = rest.rpartition("@")
    user = credentials.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in credentials else url


def parse_config(text: str, source: str) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    raw = _substitute_env(raw, "", source)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        # Never echo a secret back: drop inputs of credential keys.
        for error in errors:
            if error["loc"] and (error["loc"][-1] in ("username", "password") or error["loc"][:2] == ("store", "url")):
                error["input"] = {}
        lines = "\n".join(f"  {_describe(e)}" for e in errors)
        raise ConfigError(f"{source}: invalid configuration:\n{lines}") from None
    digest = hashlib.sha256(text.encode()).hexdigest()
    return config.model_copy(update={"source": source, "sha256": digest})


def load_config(path: Path | None = None) -> Config:
    path = path or default_config_path()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc}") from None
    return parse_config(text, str(path))
