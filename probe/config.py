"""TOML -> frozen, validated settings. No module-level instance, no side effects."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from probe.errors import ConfigError
from probe.pgurl import POSTGRES_SCHEMES, postgres_url_problem, redact

SLUG_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN, max_length=64)]
ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DNS_LINGER_S = 0.2  # probe.dns_linger_s


def _number(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)


def _between(low: float, high: float, unit: str = "", above: bool = False, whole: bool = False) -> WrapValidator:
    """A finite number from `low` (or over it, when `above`) to `high`; anything else,
    inf, nan, a string or a bool included, is refused with the whole valid range."""

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            number = None if isinstance(value, (bool, str)) else handler(value)  # TOML "5" is text
        except ValidationError:
            number = None
        if number is None or not ((low < number) if above else (low <= number)) or not number <= high:  # nan: False
            bottom = f"over {_number(low)} up" if above else f"from {_number(low)}"
            what = "a whole number" if whole else "a number"
            raise ValueError(f"must be {what} {bottom} to {_number(high)}{f' ({unit})' if unit else ''}")
        return number

    return WrapValidator(check)


Seconds = Annotated[float, _between(0.1, 86400, "seconds")]  # an interval: a tenth of a second to a day
Timeout = Annotated[float, _between(0.1, 600, "seconds")]
Port = Annotated[int, _between(1, 65535, whole=True)]


def _plain(value: str, spaces: bool = False) -> str:
    """Refuse control characters (a CR LF would end a request line) and, unless `spaces`, whitespace."""
    for at, char in enumerate(value):
        if not char.isprintable() or (char.isspace() and not (spaces and char == " ")):
            kind = "a control character" if spaces else "whitespace or a control character"
            raise ValueError(
                f"holds {kind} ({char!r}) at position {at}: remove it"
                f"{'' if spaces else ' (in a URL, percent-encode it: a space is %20)'}"
            )
    return value


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Vantage(_Frozen):
    name: Slug
    labels: dict[str, str] = {}


class StoreSettings(_Frozen):
    path: Path = Path("data/tunnelwatch.db")
    # Raw rows older than this go once summarised (analysis/compaction.py).
    keep_raw_days: Annotated[float, _between(1, 3650, "days")] = 14
    # Fleet mode: the central PostgreSQL (postgresql://user:${PASSWORD}@host/db); `path` is
    # then the local spool the forwarder uploads from (probe/fleet/forwarder.py).
    url: SecretStr | None = None
    forward_every_s: Annotated[float, _between(0.1, 3600, "seconds")] = 10
    forward_batch: Annotated[int, _between(1, 1_000_000, "measurements", whole=True)] = 5000
    # The backlog's bound; beyond it the oldest are not uploaded.
    spool_max_rows: Annotated[int, _between(100, 1_000_000_000, "measurements", whole=True)] = 5_000_000
    uplink: str | None = None  # a path's name: uploads leave through it (probe/fleet/uplink.py)

    @field_validator("path")
    @classmethod
    def _a_file(cls, path: Path) -> Path:
        if path.name in ("", "..") or path.is_dir():
            raise ValueError("must name the store's file, such as data/tunnelwatch.db, not a directory")
        return path

    @field_validator("url")
    @classmethod
    def _postgresql(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None and (problem := postgres_url_problem(url.get_secret_value())):
            raise ValueError(problem)
        return url


class ProbeSettings(_Frozen):
    interval_s: Seconds = 300
    group_intervals_s: dict[str, Seconds] = {}
    timeout_s: Timeout = 20
    concurrency: Annotated[int, _between(1, 1000, "probes", whole=True)] = 32
    per_path_concurrency: Annotated[int, _between(1, 1000, "probes", whole=True)] = 8
    ca_file: Path | None = None
    user_agent: str = "tunnelwatch/0.1 (+https://github.com/tunnelwatch/tunnelwatch)"
    body_cap_bytes: Annotated[int, _between(1024, 16 * 1024 * 1024, "bytes", whole=True)] = 256 * 1024
    # How long a dns target keeps reading after a query's first answer: a second answer that
    # differs is a forgery's trace (an injector answers first). 0: take the first and stop.
    dns_linger_s: Annotated[float, _between(0, 5, "seconds")] = DNS_LINGER_S

    @field_validator("ca_file")
    @classmethod
    def _certificates(cls, path: Path | None) -> Path | None:
        """Read now, as the probes will: a file that is missing or holds no PEM certificate
        is a config error, not a daemon that dies at start or at a reload."""
        if path is None:
            return None
        import ssl  # here: most configs name no CA file, and every command loads this module

        try:
            ssl.create_default_context(cafile=path)
        except ssl.SSLError as exc:
            raise ValueError(f"holds no PEM certificate (-----BEGIN CERTIFICATE-----): {exc.reason or exc}") from None
        except OSError as exc:
            raise ValueError(f"cannot read the CA file: {exc.strerror or exc}") from None
        return path

    @field_validator("user_agent")
    @classmethod
    def _header_value(cls, value: str) -> str:
        return _plain(value, spaces=True)


class DaemonSettings(_Frozen):
    drain_timeout_s: Annotated[float, _between(0, 600, "seconds")] = 10
    misfire_grace_s: Annotated[float, _between(1, 86400, "seconds")] = 30
    store_buffer: Annotated[int, _between(100, 10_000_000, "measurements", whole=True)] = 100_000
    store_retry_s: Annotated[float, _between(0.1, 3600, "seconds")] = 5
    # Summarise finished hours, delete raw rows past keep_raw_days.
    compact_every_s: Annotated[float, _between(1, 86400, "seconds")] = 3600


class AnalysisSettings(_Frozen):
    # Failing rounds in a row that open an outage, good rounds in a row that close it.
    open_after: Annotated[int, _between(1, 100, "rounds", whole=True)] = 2
    close_after: Annotated[int, _between(1, 100, "rounds", whole=True)] = 2
    # Good rounds in a row after an outage before a new one of the pair is new, not the same going on.
    settle_after: Annotated[int, _between(1, 100, "rounds", whole=True)] = 8
    # Median latency over its 7-day median that is "degraded", and by at least this much.
    degraded_factor: Annotated[float, _between(1, 100, "times", above=True)] = 3.0
    degraded_min_ms: Annotated[float, _between(0, 600_000, "milliseconds")] = 50
    events: list[Path] = []  # more event files (TOML or .ics) besides the shipped calendar
    # What to analyse: a SQLite store's path or the fleet's PostgreSQL URL (default: store.path),
    # and which vantage point of a store holding several (the commands' --store, --vantage).
    store: SecretStr | None = None
    vantage: str | None = None
    # Vantage points that must agree before the fleet calls an outage.
    fleet_quorum: Annotated[int, _between(1, 1000, "vantage points", whole=True)] = 2

    @field_validator("store")
    @classmethod
    def _postgresql(cls, store: SecretStr | None) -> SecretStr | None:
        url = store.get_secret_value() if store is not None else ""
        if url.startswith(POSTGRES_SCHEMES) and (problem := postgres_url_problem(url)):
            raise ValueError(problem)
        return store


class ReportSettings(_Frozen):
    timezone: str = "Asia/Shanghai"  # charts and weeks are in this time zone
    directory: Path = Path("reports")  # where the daemon writes each week's report
    keep: Annotated[int, _between(1, 1000, "reports", whole=True)] = 12  # older ones are deleted
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
    # The dashboard's basic authentication (analysis/web/), both or neither; "${ENV}" for the password.
    username: str | None = None
    password: SecretStr | None = None

    @model_validator(mode="after")
    def _both(self) -> MetricsSettings:
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together: set both, or neither")
        return self

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


def loopback(host: str) -> bool:
    """Whether `host` only answers this machine (an address in 127/8 or ::1, or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


ALERT_KINDS = ("blocked", "tunnel_down", "local_outage", "site_down", "degraded", "inconclusive")


class AlertSettings(_Frozen):
    """Who hears about which outages (analysis/alerts.py decides, probe/daemon/notifier.py sends)."""

    # Apprise URLs, one per destination (mailto://, json://, ntfy://, tgram://, ...); ${ENV} for secrets.
    urls: list[SecretStr] = []
    kinds: list[Literal[ALERT_KINDS]] = ["blocked", "tunnel_down", "local_outage", "site_down", "degraded"]  # type: ignore[valid-type]
    paths: list[str] = []  # only these paths; empty: every path
    groups: list[str] = []  # only targets of these groups; empty: every group
    min_duration_s: Annotated[float, _between(0, 7 * 86400, "seconds")] = 0  # shorter outages are never announced
    group_s: Annotated[float, _between(0, 86400, "seconds")] = 0  # gather changes this long; 0: once an interval
    via: str | None = None  # a path's name: notifications leave through it
    retry_s: Annotated[float, _between(1, 3600, "seconds")] = 30  # the first retry; doubled up to retry_max_s
    retry_max_s: Annotated[float, _between(1, 86400, "seconds")] = 3600

    @field_validator("urls")
    @classmethod
    def _known_services(cls, urls: list[SecretStr]) -> list[SecretStr]:
        if not urls:
            return urls
        import logging

        import apprise

        said = logging.getLogger("apprise")
        was, said.disabled = said.disabled, True  # Apprise logs the URL it refuses, secret and all
        try:
            for i, url in enumerate(urls):
                if apprise.Apprise.instantiate(url.get_secret_value()) is None:
                    scheme = url.get_secret_value().partition("://")[0] or "(none)"
                    raise ValueError(
                        f"[{i}]: Apprise cannot read this {scheme}:// URL (an unknown scheme, or a token, host or "
                        "key it does not accept); see https://github.com/caronc/apprise/wiki for mailto://, json://, "
                        "ntfy://, tgram://, slack://, matrix://, gotify://, discord:// and the rest"
                    )
        finally:
            said.disabled = was
        return urls


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
    """Where the tunnel server listens, so its reachability is probed too: a TCP connect, or
    for a UDP port the protocol's first handshake (probe/measure/udp_endpoint.py)."""

    host: str = Field(min_length=1)
    port: Port
    transport: Literal["tcp", "udp"] = "tcp"
    protocol: Literal["openvpn", "wireguard"] | None = None  # what answers on a UDP port
    # WireGuard: the probe peer's own key (never the tunnel's) and the server's public key.
    private_key_file: Path | None = None
    server_public_key: str | None = None
    # OpenVPN with tls-auth: the server's ta.key, its key-direction here (a client's: 1), its `auth`.
    tls_auth_file: Path | None = None
    tls_auth_direction: Literal[0, 1] | None = None
    tls_auth_digest: Literal["SHA1", "SHA256", "SHA512"] = "SHA1"
    _wireguard_keys: tuple[bytes, bytes] = PrivateAttr(default=(b"", b""))
    _tls_auth_keys: tuple[bytes, bytes] | None = PrivateAttr(default=None)

    @field_validator("host")
    @classmethod
    def _no_whitespace(cls, value: str) -> str:
        return _plain(value)

    @field_validator("server_public_key")
    @classmethod
    def _public_key(cls, value: str | None) -> str | None:
        if value is not None:
            key = _wireguard_key(
                value, "is not a WireGuard public key (44 characters of base64, as `wg pubkey` prints)"
            )
            try:  # X25519 refuses a low-order point (all zeros, say): no handshake could use it
                X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(key))
            except ValueError:
                raise ValueError(
                    "is a low-order point, not a WireGuard server's public key (`wg pubkey` of its private key)"
                ) from None
        return value

    @model_validator(mode="after")
    def _fields_for_protocol(self) -> Endpoint:
        if self.transport == "udp" and self.protocol is None:
            raise ValueError('a udp endpoint needs protocol = "openvpn" or "wireguard": the probe speaks it')
        if self.transport == "tcp" and self.protocol is not None:
            raise ValueError("protocol is for udp endpoints; a tcp endpoint is probed by a connect")
        keys = self.private_key_file is not None, self.server_public_key is not None
        if self.protocol == "wireguard" and not all(keys):
            raise ValueError(
                "a wireguard endpoint needs private_key_file (the probe peer's key, from `wg genkey`; never the "
                "tunnel's own) and server_public_key (the server's `wg pubkey`)"
            )
        if self.protocol != "wireguard" and any(keys):
            raise ValueError("private_key_file and server_public_key are for wireguard endpoints")
        if self.private_key_file is not None and self.server_public_key is not None:
            # Read now, as the probes will: a missing or bad key is a config error, not a failing probe.
            try:
                text = self.private_key_file.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                problem = exc.strerror if isinstance(exc, OSError) else "not text"
                raise ValueError(
                    f"private_key_file {str(self.private_key_file)!r}: cannot read it: {problem}"
                ) from None
            private = _wireguard_key(
                text.strip(),
                f"private_key_file {str(self.private_key_file)!r} holds no WireGuard private key "
                "(44 characters of base64, as `wg genkey` prints)",
            )
            self._wireguard_keys = (private, _wireguard_key(self.server_public_key, ""))
        if self.protocol != "openvpn" and self.tls_auth_file is not None:
            raise ValueError("tls_auth_file is for openvpn endpoints")
        if self.tls_auth_file is None and {"tls_auth_direction", "tls_auth_digest"} & self.model_fields_set:
            raise ValueError("tls_auth_direction and tls_auth_digest go with a tls_auth_file (the server's ta.key)")
        if self.tls_auth_file is not None:
            self._tls_auth_keys = _tls_auth_keys(self.tls_auth_file, self.tls_auth_direction)
        return self

    @property
    def wireguard_keys(self) -> tuple[bytes, bytes]:
        """The probe peer's private key and the server's public key, read at load."""
        return self._wireguard_keys

    @property
    def tls_auth_keys(self) -> tuple[bytes, bytes] | None:
        """OpenVPN tls-auth's HMAC keys to send and to receive with (64 bytes each), read at load."""
        return self._tls_auth_keys


def _tls_auth_keys(path: Path, direction: int | None) -> tuple[bytes, bytes]:
    """An OpenVPN static key file's two HMAC keys, as the key direction uses them."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        problem = exc.strerror if isinstance(exc, OSError) else "not text"
        raise ValueError(f"tls_auth_file {str(path)!r}: cannot read it: {problem}") from None
    begin, end = "-----BEGIN OpenVPN Static key V1-----", "-----END OpenVPN Static key V1-----"
    body = text.partition(begin)[2].partition(end)[0] if begin in text and end in text else ""
    try:
        key = bytes.fromhex("".join(line for line in body.split() if not line.startswith("#")))
    except ValueError:
        key = b""
    if len(key) != 256:
        raise ValueError(
            f"tls_auth_file {str(path)!r} holds no OpenVPN static key ({begin}, 256 bytes in hex, "
            "as `openvpn --genkey secret` writes)"
        )
    # Four 64-byte slots: cipher and HMAC of key 0, cipher and HMAC of key 1.
    hmac0, hmac1 = key[64:128], key[192:256]
    if direction is None:
        return hmac0, hmac0
    return (hmac1, hmac0) if direction == 1 else (hmac0, hmac1)


def _wireguard_key(text: str, problem: str) -> bytes:
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(problem)
    return key


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

    @field_validator("host")
    @classmethod
    def _no_whitespace(cls, value: str | None) -> str | None:
        return None if value is None else _plain(value)

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
    timeout_s: Timeout | None = None

    @field_validator("url", "host", "sni")
    @classmethod
    def _no_whitespace(cls, value: str | None) -> str | None:
        return None if value is None else _plain(value)

    @model_validator(mode="after")
    def _fields_for_kind(self) -> Target:
        if self.kind == "http":
            if not self.url:
                raise ValueError("an http target needs url")
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"url {self.url!r} must be an http:// or https:// URL with a host")
            try:
                port = parts.port
            except ValueError:  # not a number, or over 65535
                port = 0
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"url {self.url!r}: its port must be a number from 1 to 65535")
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
    alerts: AlertSettings = AlertSettings()
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
        if self.alerts.via is not None and self.alerts.via not in names:
            raise ValueError(f"alerts.via: {self.alerts.via!r} is not a path; use one of {', '.join(names)}")
        for key, asked, known in (
            ("alerts.paths", self.alerts.paths, names),
            ("alerts.groups", self.alerts.groups, sorted({t.group for t in self.targets})),
        ):
            if unknown := [a for a in asked if a not in known]:
                raise ValueError(f"{key}: {', '.join(map(repr, unknown))} unknown; use some of {', '.join(known)}")
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
    from importlib import resources

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


def _describe(error: ErrorDetails) -> str:
    if error["type"] == "extra_forbidden":
        return _unknown_key(error["loc"])
    value = error.get("input")
    shown = "" if isinstance(value, dict) or error["type"] == "missing" else f" (got {value!r})"
    msg = error["msg"].removeprefix("Value error, ")
    return f"{_key_path(error['loc'])}: {msg}{shown}"


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """A key no table has: the valid keys of its table, and the nearest of them. Its value
    is not shown: a misspelt password is still a password."""
    table: type[BaseModel] | None = Config
    for part in loc[:-1]:
        field = table.model_fields.get(part) if isinstance(part, str) and table else None
        if isinstance(part, str):
            table = _table_in(field.annotation) if field else None
    where = f"the keys of {_key_path(loc[:-1])} are" if loc[:-1] else "the top-level keys are"
    if table is None:
        return f"{_key_path(loc)}: unknown key"
    import difflib

    valid = [name for name, field in table.model_fields.items() if not field.exclude]
    near = difflib.get_close_matches(str(loc[-1]), valid, n=1)
    return f"{_key_path(loc)}: unknown key{f' (did you mean {near[0]}?)' if near else ''}; {where} {', '.join(valid)}"


def _table_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (alone, in a list or optional), or None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((model for arg in get_args(annotation) if (model := _table_in(arg))), None)


def _secret(loc: tuple[Any, ...]) -> bool:
    return bool(loc) and (
        loc[-1] in ("username", "password", "server_public_key")
        or loc[:2] in (("store", "url"), ("analysis", "store"), ("alerts", "urls"))
    )


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
        # Never echo a secret back: drop inputs of credential keys, show URLs without their password.
        for error in errors:
            if _secret(error["loc"]):
                value = error["input"]
                error["input"] = redact(value) if isinstance(value, str) and "://" in value else {}
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
