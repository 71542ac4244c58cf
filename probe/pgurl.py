"""The central store's URL: checked as libpq will read it, and shown without its password.

libpq's parse errors quote the password ("invalid percent-encoded token", "unexpected
spaces found in"), and libpq splits user:password@host at the first @ where Python splits at
the last: a URL it would misread is refused before any driver sees it, in words that quote
nothing of it, and every message a driver builds about a URL is masked.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

POSTGRES_SCHEMES = ("postgresql://", "postgres://")
USERINFO = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:%-]*")  # RFC 3986: anything else in a password is percent-encoded
SECRET_PARAMETER = re.compile(r"[?&](?:ssl)?password=([^&#]*)")


def postgres_url_problem(url: str) -> str | None:
    """What is wrong with a central store's URL, in words that quote nothing of it; None if
    libpq takes it as meant."""
    if not url.startswith(POSTGRES_SCHEMES):
        return "must be a PostgreSQL URL: postgresql://user:password@host:port/database"
    if any(char.isspace() or not char.isprintable() for char in url):
        return "holds a space or a control character: percent-encode it (a space is %20)"
    if re.search(r"%(?![0-9A-Fa-f]{2})", url):
        return "holds a % that starts no percent-encoded byte: write % itself as %25"
    credentials, at, host = url.partition("://")[2].split("/", 1)[0].partition("@")
    if at and (not USERINFO.fullmatch(credentials) or "@" in host):
        return "its user or password holds a character to percent-encode: @ is %40, / is %2F, ? is %3F, # is %23"
    from psycopg import ProgrammingError  # the driver's own parser: what it takes is what it will use
    from psycopg.conninfo import conninfo_to_dict

    try:
        parameters = conninfo_to_dict(url)
    except ProgrammingError as exc:
        return f"libpq cannot read it: {mask(str(exc).strip(), url)}"
    for port in str(parameters.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            return "its port must be a number from 1 to 65535 (and a password's : / @ ? # percent-encoded)"
    return None


def redact(url: str) -> str:
    """The URL without its password, for messages and logs. Everything up to its last @ may
    be the password: a malformed URL is masked too much rather than too little."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        credentials, _, host = rest.rpartition("@")
        if ":" in credentials:
            rest = f"{credentials.split(':', 1)[0]}:***@{host}"
    return SECRET_PARAMETER.sub(lambda m: m.group(0)[: m.start(1) - m.start(0)] + "***", f"{scheme}{sep}{rest}")


def _secrets(url: str) -> set[str]:
    """The passwords a URL holds, as written and decoded, however a parser splits it."""
    rest = url.partition("://")[2]
    found = set(SECRET_PARAMETER.findall(url))
    for credentials in (rest.partition("@")[0], rest.rpartition("@")[0]):
        if "@" in rest and ":" in credentials:
            found.add(credentials.split(":", 1)[1])
    return {secret for written in found for secret in (written, unquote(written)) if secret}


def mask(text: str, url: str) -> str:
    """A driver's message about `url` without the URL's passwords (whole, as written or
    decoded: the pieces libpq quotes of a URL it misreads are its callers' to refuse)."""
    text = text.replace(url, redact(url))
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
