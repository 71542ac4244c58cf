"""The censorship lab's network: three namespaces joined by veth pairs.

    tw-vp (vantage point) 10.66.1.2 --- 10.66.1.1 tw-rt (censoring ISP router) 10.66.2.1 --- tw-net ("internet")

tw-rt forwards between the two and runs the ISP's resolver; censorship is injected there
with iptables and the resolver's configuration. tw-net holds the sites (nginx), a clean
resolver, a block page and the tunnel's exit (microsocks). Everything is torn down at the
end, and leftovers of a killed run are removed before building. TW_LAB_PREFIX (default "tw-")
names the namespaces, so two labs can run side by side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

PREFIX = os.environ.get("TW_LAB_PREFIX", "tw-")
VP, RT, NET = f"{PREFIX}vp", f"{PREFIX}rt", f"{PREFIX}net"
VP_ADDR, RT_VP_ADDR, RT_NET_ADDR, NET_ADDR = "10.66.1.2", "10.66.1.1", "10.66.2.1", "10.66.2.2"
NEWS, PORTAL, SHOP = "10.66.2.10", "10.66.2.11", "10.66.2.12"
BLOCKPAGE, RESOLVER, SOCKS, SHADOWSOCKS = "10.66.2.30", "10.66.2.53", "10.66.2.20", "10.66.2.21"
WG_ENDPOINT, WG_SERVER, WG_CLIENT, WG_PORT = "10.66.2.22", "10.99.0.1", "10.99.0.2", 51820
HTTP_PROXY = "10.66.2.23"


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def in_ns(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


NETNS_ETC = Path("/etc/netns")  # `ip netns exec NS` mounts /etc/netns/NS/resolv.conf over /etc/resolv.conf


def clean() -> None:
    """Remove every namespace of ours, from this run or a killed one."""
    for ns in (VP, RT, NET):
        shutil.rmtree(NETNS_ETC / ns, ignore_errors=True)
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(PREFIX):
            pids = sh("ip", "netns", "pids", name, check=False).stdout.split()
            for pid in pids:
                sh("kill", "-9", pid, check=False)
            sh("ip", "netns", "del", name, check=False)


def _link(a: str, a_if: str, a_addr: str, b: str, b_if: str, b_addr: str) -> None:
    sh("ip", "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b)
    in_ns(a, "ip", "addr", "add", f"{a_addr}/24", "dev", a_if)
    in_ns(b, "ip", "addr", "add", f"{b_addr}/24", "dev", b_if)
    in_ns(a, "ip", "link", "set", a_if, "up")
    in_ns(b, "ip", "link", "set", b_if, "up")


@contextmanager
def network(extra_net_addresses: Sequence[str]) -> Iterator[None]:
    clean()
    try:
        for ns in (VP, RT, NET):
            sh("ip", "netns", "add", ns)
            in_ns(ns, "ip", "link", "set", "lo", "up")
        _link(VP, "vp0", VP_ADDR, RT, "rt0", RT_VP_ADDR)
        _link(RT, "rt1", RT_NET_ADDR, NET, "in0", NET_ADDR)
        for address in extra_net_addresses:
            in_ns(NET, "ip", "addr", "add", f"{address}/32", "dev", "lo")
        in_ns(VP, "ip", "route", "add", "default", "via", RT_VP_ADDR)
        in_ns(NET, "ip", "route", "add", "default", "via", RT_NET_ADDR)
        in_ns(RT, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        # Programs in the "internet" (the HTTP proxy resolving for its clients) ask the clean resolver.
        (NETNS_ETC / NET).mkdir(parents=True, exist_ok=True)
        (NETNS_ETC / NET / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
        yield
    finally:
        clean()
