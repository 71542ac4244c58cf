"""DNS messages on the wire for probe/measure/resolver.py: the queries for a name, and what an
answer to one of them says.

dnspython renders a query for a name and type once in the process (a query holds nothing the
network said); every query is that rendering with its own random id. An answer is read as
dnspython's wire parser reads it without building a Message (building one was most of a
lookup's CPU), in one pass: its header and question (repeated as sent) are matched to a query, the
addresses of the type asked are read as dnspython's A and AAAA rdata read them, and every
other record is stepped over by its length, as glibc's stub does. An answer of any other shape
(truncated, the question written otherwise, OPT or TSIG out of place, bytes left over) is read
by dnspython whole, and one dnspython refuses is no answer.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import dns.exception
import dns.flags
import dns.ipv4
import dns.ipv6
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.wire

EDNS_PAYLOAD = 1232  # the 2020 DNS flag day's size: no fragmented answers
HEADER_BYTES = 12  # a message's fixed header; the question's name follows it
HEADER = struct.Struct("!HHHHHH")  # id, flags, then the four sections' record counts
RR_HEADER = struct.Struct("!HHIH")  # a record's type, class, TTL and data length, after its owner name
RR_HEADER_BYTES = RR_HEADER.size
U16 = struct.Struct("!H")  # the id (bytes 0-1), a TCP length
QR, QR_OPCODE = int(dns.flags.QR), 0xF800  # the flags' QR bit, and with the opcode: an answer to a standard query
TC = int(dns.flags.TC)
ID_BATCH = 2048  # query ids drawn at once
MAX_RCODES = 1024  # flag combinations whose rcode is kept
MAX_RENDERINGS = 4096  # names and types whose query rendering is kept
QUESTION_TAIL = 4  # a question's type and class, after its name
ANSWER, AUTHORITY, ADDITIONAL = range(3)  # the sections after the question
# An address record's data as text: what dnspython's A and AAAA rdata classes read it with
# (their `address`), without building the rdata object around it.
ADDRESS_TEXT = {dns.rdatatype.A: dns.ipv4.inet_ntoa, dns.rdatatype.AAAA: dns.ipv6.inet_ntoa}
ROOT_LABELS = dns.name.root.labels  # an OPT record's owner
# A compression pointer (0xC0, then the offset) to the question's name, right after the header:
# most answers name their records so, and that name is the question's, checked already.
POINTER = 0xC0
IN, OPT, TSIG = int(dns.rdataclass.IN), int(dns.rdatatype.OPT), int(dns.rdatatype.TSIG)


@dataclass(slots=True, eq=False)  # not frozen: made for every answer, frozen ones cost more
class Reply:
    """One answer to a query: its rcode, TC bit and the addresses of the query's type it holds."""

    rcode: dns.rcode.Rcode
    truncated: bool
    addresses: tuple[str, ...]  # the answer section's addresses of the type asked, in order, once each
    received_ns: int  # the kernel's arrival time (CLOCK_REALTIME)


@dataclass(slots=True, eq=False)  # not frozen: two are made on every lookup, frozen ones cost more
class Query:
    """One query as sent: what an answer to it must repeat (its id and question)."""

    name: dns.name.Name
    rdtype: dns.rdatatype.RdataType
    id: int
    wire: bytes
    question: bytes  # the question as sent (name, type, class): an answer repeats it, in any case

    def message(self) -> dns.message.Message:
        """The query as dnspython's message, for answers dnspython reads whole."""
        message = dns.message.make_query(self.name, self.rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        message.id = self.id
        return message


Q = TypeVar("Q", bound=Query)

_renderings: dict[tuple[tuple[bytes, ...], int], tuple[bytes, bytes]] = {}  # by the name's labels, as written


def _rendering(name: dns.name.Name, rdtype: dns.rdatatype.RdataType) -> tuple[bytes, bytes]:
    """dnspython's wire form of a query for `name` and `rdtype` (recursion desired, EDNS0) but
    its id, and its question as sent (name, type, class): the bytes of every such query but the
    id. Kept per name and type, as a query says nothing of what the network answers."""
    key = (name.labels, rdtype)
    known = _renderings.get(key)
    if known is None:
        if len(_renderings) >= MAX_RENDERINGS:
            _renderings.clear()
        wire = dns.message.make_query(name, rdtype, use_edns=0, payload=EDNS_PAYLOAD).to_wire()
        question_end = HEADER_BYTES + len(name.to_digestable()) + QUESTION_TAIL  # the name uncompressed, type, class
        known = _renderings[key] = (wire[2:], wire[HEADER_BYTES:question_end])
    return known


def make_queries(name: dns.name.Name, rdtypes: Sequence[dns.rdatatype.RdataType], make: type[Q]) -> list[Q]:
    """One query per type, each with its own random id, recursion desired and EDNS0:
    dnspython's rendering for the name and type with the id set; `make` is Query or a subclass
    that keeps more of the query (one object per query)."""
    made = []
    ids = _ids
    for rdtype in rdtypes:
        after_id, question = _renderings.get((name.labels, rdtype)) or _rendering(name, rdtype)
        query_id = ids.pop() if ids else _random_id()
        made.append(make(name, rdtype, query_id, U16.pack(query_id) + after_id, question))
    return made


_ids: list[int] = []


def _random_id() -> int:
    """A random query id, as dnspython's: from the system's source (os.urandom), read 4 KiB at a
    time rather than once per query."""
    if not _ids:
        _ids.extend(struct.unpack(f"!{ID_BATCH}H", os.urandom(2 * ID_BATCH)))
    return _ids.pop()


_rcodes: dict[tuple[int, int], dns.rcode.Rcode] = {}  # dnspython's from_flags by (flags, EDNS flags): servers use few


def _rcode(flags: int, ednsflags: int) -> dns.rcode.Rcode:
    """dnspython's rcode of a header's flags and an OPT record's flags, kept (of at most
    MAX_RCODES combinations: a server may send any flags)."""
    if len(_rcodes) >= MAX_RCODES:
        _rcodes.clear()
    rcode = _rcodes[flags, ednsflags] = dns.rcode.from_flags(flags, ednsflags)
    return rcode


def _slow(data: bytes, queries: Sequence[Query]) -> tuple[int, dns.rcode.Rcode, bool, tuple[str, ...]] | None:
    """dnspython's whole reading of a message and its is_response (a truncated one too)."""
    try:
        message = dns.message.from_wire(data, raise_on_truncation=True)
    except dns.message.Truncated as cut:
        message = cut.message()  # type: ignore[no-untyped-call]  # unannotated in dnspython
    except dns.exception.DNSException:
        return None  # not a DNS message: ignored, as every stub does
    for index, query in enumerate(queries):
        if query.id == message.id and query.message().is_response(message):
            rdtype = query.rdtype
            addresses = (
                str(rdata.address)
                for rrset in message.answer
                if rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN
                for rdata in rrset
            )
            truncated = bool(message.flags & dns.flags.TC)
            return index, message.rcode(), truncated, tuple(dict.fromkeys(addresses))
    return None


def read(data: bytes, received_ns: int, queries: Sequence[Query]) -> tuple[int, Reply] | None:
    """Which of `queries` `data` answers (its index) and the answer; None for a datagram that
    answers none of them (another id, not a DNS message), ignored as every stub does.

    The common answer (its header and the question repeated as sent) is read as dnspython's
    wire parser reads it, without building a message: each record's owner name and header are
    read, the data of an address record of the type asked is read as dnspython's A and AAAA
    rdata read it, every other record is stepped over by its length (as glibc's stub does), and
    the OPT record gives the extended rcode; an owner name other than a pointer to the question
    or the root is read by dnspython's parser. Any other answer (truncated, the question
    written otherwise, OPT or TSIG out of place, bytes left over) is read by dnspython whole."""
    if len(data) < HEADER_BYTES:
        return None
    query_id, flags, questions, answers, authority, additional = HEADER.unpack_from(data)
    if flags & QR_OPCODE != QR:
        return None  # not an answer to a standard query: no need to read it
    ours = False
    for index, query in enumerate(queries):
        if query.id != query_id:
            continue
        ours = True
        question = query.question
        at = HEADER_BYTES + len(question)
        echoed = data[HEADER_BYTES:at]
        if questions != 1 or (echoed != question and echoed.lower() != question.lower()):
            continue
        if flags & TC:
            break  # truncated: dnspython's reading
        rdtype, size, extra_from = query.rdtype, len(data), answers + authority  # the additional section's start
        addresses: list[str] = []
        ednsflags = None
        try:
            for record in range(extra_from + additional):
                first = data[at]  # IndexError past the end
                if first == POINTER and data[at + 1] == HEADER_BYTES:  # the question's name, read already: ours
                    at += 2
                    root = False
                elif not first:  # the root (an OPT record's owner)
                    at += 1
                    root = True
                else:
                    parser = dns.wire.Parser(data, at)
                    root = parser.get_name(decompress=True).labels == ROOT_LABELS
                    at = parser.current
                kind, rdclass, ttl, length = RR_HEADER.unpack_from(data, at)  # struct.error past the end
                at += RR_HEADER_BYTES
                end = at + length
                if end > size:
                    raise dns.exception.FormError
                if kind == rdtype and rdclass == IN and record < answers:
                    addresses.append(ADDRESS_TEXT[rdtype](data[at:end]))
                elif kind == OPT and record >= extra_from and ednsflags is None and root:
                    ednsflags = ttl
                elif kind == OPT or kind == TSIG:
                    break  # out of place: dnspython's reading
                at = end
            else:
                if at == size:  # no bytes left over
                    found = tuple(addresses) if len(addresses) < 2 else tuple(dict.fromkeys(addresses))
                    rcode = _rcodes.get((flags, ednsflags or 0))
                    if rcode is None:  # NOERROR is 0: no `or`
                        rcode = _rcode(flags, ednsflags or 0)
                    return index, Reply(rcode, False, found, received_ns)
        except (dns.exception.DNSException, ValueError, struct.error, IndexError):
            pass
        break
    if not ours:
        return None  # not an answer to a query of ours
    found_slow = _slow(data, queries)
    return None if found_slow is None else (found_slow[0], Reply(*found_slow[1:], received_ns))
