"""The resolver's quick reading of an answer (probe/measure/answers.py `read`: records stepped
over by their length, the address records of the type asked read as dnspython's A and AAAA
rdata read them) is a shortcut through dnspython's reading, never a parser with opinions of its
own: over many generated answers (CNAME chains, records of other types and classes, authority
and additional sections, EDNS with extended rcodes, the question echoed in another case, names
written in full rather than compressed) and every truncation of them, what `read` finds is what
dnspython's whole message says (`_slow`), and the valid answers go the quick way."""

from __future__ import annotations

import random
from collections.abc import Iterator

import dns.edns
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest

import probe.measure.answers as answers_module
from probe.measure.answers import Query, make_queries, read

NAME = dns.name.from_text("www.site.test.")
A, AAAA = dns.rdatatype.A, dns.rdatatype.AAAA
RCODES = [dns.rcode.NOERROR, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL, dns.rcode.REFUSED, dns.rcode.BADVERS]


def _address(rng: random.Random, rdtype: dns.rdatatype.RdataType) -> str:
    if rdtype == A:
        return ".".join(str(rng.randrange(256)) for _ in range(4))
    return ":".join(f"{rng.randrange(65536):x}" for _ in range(8))


def _answer(rng: random.Random, query: Query) -> bytes:
    """A well-formed answer to `query`, of a random shape."""
    message = dns.message.make_response(query.message())
    owner = NAME
    for hop in range(rng.choice([0, 0, 1, 2])):  # a CNAME chain: owners not the question's pointer
        target = dns.name.from_text(f"hop{hop}.cdn{rng.randrange(9)}.test.")
        message.answer.append(dns.rrset.from_text(owner, 60, "IN", "CNAME", target.to_text()))
        owner = target
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        kind = rng.choice([query.rdtype, query.rdtype, A, AAAA])
        message.answer.append(dns.rrset.from_text(owner, rng.randrange(86400), "IN", kind, _address(rng, kind)))
    if rng.random() < 0.3:  # the type asked, in another class (Hesiod: dnspython's generic rdata)
        size = 4 if query.rdtype == A else 16
        data = rf"\# {size} {rng.randbytes(size).hex()}"
        message.answer.append(dns.rrset.from_text(owner, 60, "HS", dns.rdatatype.to_text(query.rdtype), data))
    if rng.random() < 0.2:
        message.answer.append(dns.rrset.from_text(owner, 60, "CH", "TXT", '"chaos"'))
    if rng.random() < 0.4:
        soa = "ns.site.test. admin.site.test. 1 7200 3600 1209600 300"
        message.authority.append(dns.rrset.from_text("site.test.", 300, "IN", "SOA", soa))
    if rng.random() < 0.3:
        message.additional.append(dns.rrset.from_text("ns.site.test.", 300, "IN", "A", _address(rng, A)))
    rcode = rng.choice(RCODES)
    if rng.random() < 0.7 or rcode > 15:  # an extended rcode needs the OPT record
        message.use_edns(0, payload=rng.choice([512, 1232, 4096]))
    else:
        message.use_edns(False)
    message.set_rcode(rcode)
    wire = bytearray(message.to_wire())
    if rng.random() < 0.3:  # the question echoed in another case (0x20), as some servers do
        end = 12 + len(query.question) - 4
        wire[12:end] = bytes(wire[12:end]).upper()
    return bytes(wire)


def _seen(found: tuple[int, answers_module.Reply] | None) -> object:
    if found is None:
        return None
    index, reply = found
    return index, reply.rcode, reply.truncated, reply.addresses


def _expected(data: bytes, query: Query) -> object:
    found = answers_module._slow(data, [query])
    return None if found is None else (found[0], *found[1:])


@pytest.fixture
def slow_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    calls: list[bytes] = []
    whole = answers_module._slow

    def counted(data: bytes, queries: list[Query]) -> object:
        calls.append(data)
        return whole(data, queries)

    monkeypatch.setattr(answers_module, "_slow", counted)
    yield calls


def test_the_quick_reading_finds_what_dnspython_finds(slow_calls: list[bytes]) -> None:
    rng = random.Random(15)
    quick = 0
    for _ in range(150):
        query = make_queries(NAME, [rng.choice([A, AAAA])], Query)[0]
        data = _answer(rng, query)
        before = len(slow_calls)
        assert _seen(read(data, 0, [query])) == _expected(data, query), data
        quick += len(slow_calls) == before + 1  # read called _slow neither (only _expected did)
        for cut in range(len(data)):  # every truncation: never read as a whole answer
            assert _seen(read(data[:cut], 0, [query])) == _expected(data[:cut], query), (data, cut)
        assert _seen(read(data + b"\0", 0, [query])) == _expected(data + b"\0", query)  # bytes left over
    assert quick == 150  # every well-formed answer went the quick way


def test_an_answer_to_another_query_or_id_is_not_ours() -> None:
    rng = random.Random(16)
    for _ in range(50):
        query, other = make_queries(NAME, [A, AAAA], Query)
        data = _answer(rng, query)
        assert _seen(read(data, 0, [other])) is None  # another id (and type)
        found = read(data, 0, [other, query])
        assert found is not None and found[0] == 1
