"""What the resolver reads of answers of every shape, from a DNS server in the test that writes
them with dnspython: the quick reading (probe/measure/answers.py) must store what dnspython's
whole reading of the same message says, and ignore what dnspython refuses, as before it.

Each case is a `dns` target asked of a server on loopback whose answers to A and AAAA are
built from the query by the case's function (a list of wire messages, sent in order)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.tsig
import pytest

import probe.measure.answers as answers_module
import probe.measure.resolver as resolver_module
from probe.measure.dns import Resolver, lookup
from probe.model import Measurement, Trace
from tests.servers import LOOPBACK
from tests.test_dns import lab, run

Answers = Callable[[dns.message.Message], list[bytes]]
REAL_A, REAL_AAAA, OTHER_A = "10.20.30.40", "2001:db8::1:0:0:7", "10.99.99.99"


@contextmanager
def crafting(answers: Answers) -> Iterator[int]:
    """A UDP server on loopback sending, for each query, the messages `answers` builds."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                data, client = sock.recvfrom(4096)
            except TimeoutError:
                continue
            for wire in answers(dns.message.from_wire(data)):
                sock.sendto(wire, client)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1])
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def response(query: dns.message.Message, *records: str, rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
    """dnspython's answer to `query` (EDNS0 as asked) with `records` ("name ttl IN type data")
    in the answer section."""
    answer = dns.message.make_response(query)
    answer.set_rcode(dns.rcode.Rcode.make(rcode))
    for record in records:
        name, ttl, rdclass, rdtype, data = record.split(" ", 4)
        answer.answer.append(dns.rrset.from_text(name, int(ttl), rdclass, rdtype, data))
    return answer


def real(query: dns.message.Message) -> dns.message.Message:
    """The plain answer: REAL_A or REAL_AAAA for the name asked."""
    question = query.question[0]
    address = REAL_A if question.rdtype == dns.rdatatype.A else REAL_AAAA
    return response(query, f"{question.name} 60 IN {dns.rdatatype.to_text(question.rdtype)} {address}")


def probe(tmp_path: Path, answers: Answers, host: str = "site.test", linger_s: float = 0.2) -> Measurement:
    with crafting(answers) as port:
        paths = {"direct": f'kind = "direct"\nresolver = ["{LOOPBACK}:{port}"]'}
        targets = {"name": f'kind = "dns"\nhost = "{host}"\ntimeout_s = 2'}
        return run(lab(tmp_path, targets, paths, dns_linger_s=linger_s), "name")


def test_a_cname_chain_with_authority_and_additional_records(tmp_path: Path) -> None:
    def answers(query: dns.message.Message) -> list[bytes]:
        question = query.question[0]
        kind = dns.rdatatype.to_text(question.rdtype)
        address = REAL_A if kind == "A" else REAL_AAAA
        other = OTHER_A if kind == "A" else "2001:db8::99"
        answer = response(
            query,
            f"{question.name} 60 IN CNAME edge.cdn.test.",
            f"edge.cdn.test. 60 IN {kind} {address}",
            f"edge.cdn.test. 60 IN {kind} {other}",
            f'{question.name} 60 IN TXT "not an address"',
        )
        answer.authority.append(dns.rrset.from_text("cdn.test.", 60, "IN", "NS", "ns.cdn.test."))
        answer.additional.append(dns.rrset.from_text("ns.cdn.test.", 60, "IN", "A", "10.0.0.53"))
        return [answer.to_wire()]

    m = probe(tmp_path, answers)
    assert (m.failure, m.dns_rcode) == (None, "NOERROR"), m.detail
    assert set(m.addresses) == {REAL_A, OTHER_A, REAL_AAAA, "2001:db8::99"}  # never the glue's 10.0.0.53


def test_nxdomain_with_an_soa_in_authority(tmp_path: Path) -> None:
    def answers(query: dns.message.Message) -> list[bytes]:
        answer = response(query, rcode=dns.rcode.NXDOMAIN)
        answer.authority.append(dns.rrset.from_text("test.", 60, "IN", "SOA", "ns.test. admin.test. 1 60 60 60 60"))
        return [answer.to_wire()]

    m = probe(tmp_path, answers)
    assert (m.failure, m.dns_rcode, m.addresses) == ("dns_nxdomain_error", "NXDOMAIN", ()), m.detail


def test_the_extended_rcode_of_the_opt_record_is_read(tmp_path: Path) -> None:
    """BADVERS (16) is 0 in the header and 1 in the OPT record's extended rcode."""

    def answers(query: dns.message.Message) -> list[bytes]:
        return [response(query, rcode=dns.rcode.BADVERS).to_wire()]

    m = probe(tmp_path, answers)
    assert (m.dns_rcode, m.failure, m.addresses) == ("BADVERS", "dns_server_misbehaving", ()), m.detail


def test_a_question_echoed_in_another_case_is_an_answer(tmp_path: Path) -> None:
    def answers(query: dns.message.Message) -> list[bytes]:
        wire = bytearray(real(query).to_wire())
        name = query.question[0].name.to_wire()
        wire[12 : 12 + len(name)] = name.upper()  # as a resolver using 0x20 mixed case would
        return [bytes(wire)]

    m = probe(tmp_path, answers, host="Site.Test")
    assert (m.failure, m.addresses) == (None, (REAL_A, REAL_AAAA)), m.detail


def _forged(query: dns.message.Message) -> dns.message.Message:
    """An answer to `query` with other addresses than the real one."""
    question = query.question[0]
    address = OTHER_A if _is_a(query) else "2001:db8::99"
    return response(query, f"{question.name} 60 IN {dns.rdatatype.to_text(question.rdtype)} {address}")


def _another_question(query: dns.message.Message) -> bytes:
    other = dns.message.make_query("other.test", query.question[0].rdtype)
    other.id = query.id
    return _forged(other).to_wire()


def _opt_in_answer(query: dns.message.Message) -> bytes:
    """An answer whose answer section ends with an OPT record (dnspython: BadEDNS)."""
    answer = _forged(query)
    answer.use_edns(False)
    wire = bytearray(answer.to_wire())
    wire[6:8] = (int.from_bytes(wire[6:8], "big") + 1).to_bytes(2, "big")  # one more answer record
    return bytes(wire) + b"\x00" + dns.rdatatype.OPT.to_bytes(2, "big") + b"\x04\xd0" + bytes(6)


def _signed(query: dns.message.Message) -> bytes:
    """Signed with a TSIG key the probe does not have (dnspython: UnknownTSIGKey)."""
    answer = _forged(query)
    answer.use_tsig(dns.tsig.Key("key.test.", "c2VjcmV0c2VjcmV0c2VjcmV0"))
    return answer.to_wire()


REFUSED_BY_DNSPYTHON: dict[str, Callable[[dns.message.Message], bytes]] = {
    "trailing-bytes": lambda query: _forged(query).to_wire() + b"junk",
    "cut-short": lambda query: _forged(query).to_wire()[:-3],
    "another-question": _another_question,
    "opt-in-the-answer-section": _opt_in_answer,
    "signed-tsig": _signed,
}


@pytest.mark.parametrize("case", REFUSED_BY_DNSPYTHON)
def test_what_dnspython_refuses_is_ignored_and_the_real_answer_taken(tmp_path: Path, case: str) -> None:
    """A message dnspython would not take as the answer comes first, with other addresses: it
    is neither the answer nor a later answer (no conflict); the real one that follows is."""
    bad = REFUSED_BY_DNSPYTHON[case]
    with pytest.raises(Exception):  # noqa: B017  # any of dnspython's reasons
        query = dns.message.make_query("site.test", "A")
        dns.message.from_wire(bad(query)).is_response(query) or _raise()

    def answers(query: dns.message.Message) -> list[bytes]:
        return [bad(query), real(query).to_wire()]

    m = probe(tmp_path, answers)
    assert (m.failure, m.addresses) == (None, (REAL_A, REAL_AAAA)), m.detail


def _raise() -> None:
    raise ValueError("not an answer to the query")


def test_a_refused_answer_without_a_question_is_an_answer(tmp_path: Path) -> None:
    def answers(query: dns.message.Message) -> list[bytes]:
        refused = dns.message.Message(id=query.id)
        refused.flags = dns.flags.QR | dns.flags.RD | dns.flags.RA
        refused.set_rcode(dns.rcode.REFUSED)
        return [refused.to_wire()]

    m = probe(tmp_path, answers)
    assert (m.failure, m.dns_rcode) == ("dns_refused_error", "REFUSED"), m.detail


def test_a_later_different_answer_is_still_a_conflict(tmp_path: Path) -> None:
    def answers(query: dns.message.Message) -> list[bytes]:
        if not _is_a(query):
            return [real(query).to_wire()]
        forged = response(query, f"{query.question[0].name} 60 IN A {OTHER_A}")
        return [forged.to_wire(), real(query).to_wire()]

    m = probe(tmp_path, answers)
    assert (m.failure, m.failed_operation) == ("dns_answers_conflict", "resolve"), m.detail
    assert m.addresses == (OTHER_A, REAL_AAAA, REAL_A)


def _is_a(query: dns.message.Message) -> bool:
    return query.question[0].rdtype == dns.rdatatype.A


@contextmanager
def gathering(count: int) -> Iterator[tuple[int, list[tuple[str, int]]]]:
    """A UDP server on loopback holding its answers until `count` queries came (or 2 s passed),
    so the lookups that sent them run side by side; then it answers each from its name (the
    address 10.0.0.N for nN.test, A; no AAAA). Yields its port and the queries' sources."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.settimeout(0.05)
    sources: list[tuple[str, int]] = []
    stop = threading.Event()

    def serve() -> None:
        held: list[tuple[bytes, tuple[str, int]]] = []
        deadline = None
        while not stop.is_set():
            try:
                held.append(sock.recvfrom(4096))
                sources.append(held[-1][1])
                deadline = deadline or time.monotonic() + 2
            except TimeoutError:
                pass
            if held and (len(held) >= count or time.monotonic() > (deadline or 0)):
                for data, client in held:
                    query = dns.message.from_wire(data)
                    question = query.question[0]
                    records = []
                    if _is_a(query):
                        number = question.name.labels[0].decode()[1:]
                        records.append(f"{question.name} 60 IN A 10.0.0.{number}")
                    sock.sendto(response(query, *records).to_wire(), client)
                held.clear()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(sock.getsockname()[1]), sources
    finally:
        stop.set()
        thread.join(5)
        sock.close()


def _lookups(port: int, names: list[str]) -> list[list[str]]:
    resolver = Resolver(servers=(f"{LOOPBACK}:{port}",))

    async def main() -> list[list[str]]:
        found = await asyncio.gather(*(lookup(resolver, name, Trace()) for name in names))
        assert not resolver_module._LINKS, "a shared socket outlived its lookups"
        return list(found)

    return asyncio.run(main())


def test_lookups_side_by_side_share_one_socket_and_each_gets_its_own_answers() -> None:
    """Ten lookups at once to one server: their twenty queries leave from one source port (one
    socket, not one per lookup), each lookup takes the answers to its own queries only, and
    the socket is closed when the last lookup ends."""
    names = [f"n{number}.test" for number in range(1, 11)]
    with gathering(2 * len(names)) as (port, sources):
        found = _lookups(port, names)
    assert found == [[f"10.0.0.{number}"] for number in range(1, 11)]
    assert len(sources) == 20 and len(set(sources)) == 1, sources


def test_a_lookup_whose_ids_were_used_on_the_shared_socket_asks_on_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two lookups at once that drew the same query ids: the second does not send them on the
    socket the first uses (its answers would be taken for the first's), but on a socket of
    its own, and each lookup gets the answer to its own name."""
    monkeypatch.setattr(answers_module, "_ids", [0x1234] * 4)  # the ids drawn next: the same for both lookups
    with gathering(4) as (port, sources):
        found = _lookups(port, ["n1.test", "n2.test"])
    assert found == [["10.0.0.1"], ["10.0.0.2"]]
    assert len(set(sources)) == 2, sources


def test_more_lookups_side_by_side_than_a_socket_takes_spread_over_sockets() -> None:
    """Forty lookups at once: at most MAX_SHARERS (16) on one socket, whose receive buffer holds
    their answers together, so three sockets; each lookup still gets its own answer."""
    assert resolver_module.MAX_SHARERS == 16
    names = [f"n{number}.test" for number in range(1, 41)]
    with gathering(2 * len(names)) as (port, sources):
        found = _lookups(port, names)
    assert found == [[f"10.0.0.{number}"] for number in range(1, 41)]
    assert len(sources) == 80 and len(set(sources)) == 3, sorted(set(sources))
