"""A DNS injector for the lab's router, as the Great Firewall injects: it sees a query for a
name cross the border, answers it at once with a forged A record spoofed from the resolver
asked, and lets the real query go on late, so the real answer arrives after the forgery.

Run inside the router's namespace:

    python injector.py IFACE RESOLVER NAME FORGED_ADDRESS HOLD_S

It reads every IPv4 packet arriving on IFACE (the link toward the vantage point) with an
AF_PACKET socket, which sees packets before netfilter does, and acts on the queries sent to
RESOLVER across the router (the router's own resolver is inside the border). The router's FORWARD chain drops
the queries for NAME (tests/lab/test_tricks.py adds the rule), and this program sends each of
them on itself after HOLD_S seconds through a raw socket, unchanged (the vantage point's
address and port as its source): the real resolver answers the vantage point as usual, late.
Queries of any type are held; only A queries get a forged answer. "ready" on standard output
says the sockets are open.
"""

from __future__ import annotations

import heapq
import select
import socket
import struct
import sys
import time

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.rrset

ETH_P_IP = 0x0800
PACKET_OUTGOING = 4
IPV4 = struct.Struct("!BBHHHBBH4s4s")
UDP = struct.Struct("!HHHH")


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    """An IPv4 UDP datagram with both checksums filled in."""
    length = UDP.size + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length)
    udp_sum = checksum(pseudo + UDP.pack(sport, dport, length, 0) + payload) or 0xFFFF
    header = IPV4.pack(0x45, 0, IPV4.size + length, 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    header = header[:10] + struct.pack("!H", checksum(header)) + header[12:]
    return header + UDP.pack(sport, dport, length, udp_sum) + payload


def forged_answer(query: dns.message.Message, name: dns.name.Name, forged: str) -> bytes:
    answer = dns.message.make_response(query)
    answer.answer.append(dns.rrset.from_text(name, 60, "IN", "A", forged))
    return answer.to_wire()


def main(iface: str, resolver: str, name_text: str, forged: str, hold_s: float) -> None:
    name = dns.name.from_text(name_text)
    sniffer = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP))
    sniffer.bind((iface, ETH_P_IP))
    sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)  # IP_HDRINCL
    held: list[tuple[float, int, bytes]] = []  # (due, sequence, the query's IP packet)
    print("ready", flush=True)
    sequence = 0
    while True:
        timeout = max(held[0][0] - time.monotonic(), 0) if held else None
        if select.select([sniffer], [], [], timeout)[0]:
            packet, address = sniffer.recvfrom(65535)
            if address[2] != PACKET_OUTGOING:
                sequence += 1
                seen = inspect(packet, socket.inet_aton(resolver), name, forged, sender)
                if seen is not None:
                    heapq.heappush(held, (time.monotonic() + hold_s, sequence, seen))
        while held and held[0][0] <= time.monotonic():
            packet = heapq.heappop(held)[2]
            sender.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))


def inspect(packet: bytes, resolver: bytes, name: dns.name.Name, forged: str, sender: socket.socket) -> bytes | None:
    """The packet to hold when it is a UDP query to `resolver` for `name` (its forged answer
    sent first)."""
    if len(packet) < IPV4.size + UDP.size or packet[9] != socket.IPPROTO_UDP:
        return None
    header_length = (packet[0] & 0x0F) * 4
    total = struct.unpack("!H", packet[2:4])[0]
    packet = packet[:total]
    src, dst = packet[12:16], packet[16:20]
    sport, dport, _, _ = UDP.unpack(packet[header_length : header_length + UDP.size])
    if dst != resolver or dport != 53:
        return None
    try:
        query = dns.message.from_wire(packet[header_length + UDP.size :])
    except dns.exception.DNSException:
        return None
    if not query.question or query.question[0].name != name:
        return None
    if query.question[0].rdtype == dns.rdatatype.A:
        forgery = udp_packet(dst, src, 53, sport, forged_answer(query, name, forged))
        sender.sendto(forgery, (socket.inet_ntoa(src), 0))
    # Built again, checksums and all: a packet read off a veth may carry a partial checksum
    # (offloaded to a "device" that never computes it), which the resolver's kernel would refuse.
    return udp_packet(src, dst, sport, dport, packet[header_length + UDP.size :])


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
