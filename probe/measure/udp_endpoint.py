"""A tunnel server's UDP port, probed with the protocol's own first handshake message.

A UDP port that drops what it does not understand looks the same open, filtered or down:
only an answer proves the server is there. So the probe sends what a client sends first and
waits for the server's first answer, checked against what was sent:

- OpenVPN: the client's P_CONTROL_HARD_RESET_CLIENT_V2 (no key needed); the server's
  P_CONTROL_HARD_RESET_SERVER_V2 (or a bare P_ACK_V1) must acknowledge our session id. A
  server with tls-auth drops a packet without its HMAC: given the server's ta.key, the probe
  adds it (and checks the answer's); a tls-crypt server stays silent to the probe.
- WireGuard: a handshake initiation from a probe peer of its own (Noise_IKpsk2 through the
  noiseprotocol library, mac1 with hashlib's BLAKE2s); the response must decrypt with the
  handshake's state. Never the tunnel's own key: the server would move the live tunnel's
  endpoint to the probe's port. One probe key per vantage point: the server takes a key's
  initiation only if its timestamp is later than the last it took, so a second vantage point
  whose clock is behind would go unanswered. A server under load sends a cookie reply
  instead, and only after checking our mac1: it counts as answered, unverified. Its cookie is
  sealed with XChaCha20-Poly1305 (which `cryptography` lacks) under a key made from the
  server's public key, so even opened it would prove only that something which saw our
  initiation and knows that public key answered, not the private key a response proves; it
  carries our sender index, which only something on the path can copy.

A lost datagram is sent again every RESEND_S (WireGuard: a fresh initiation, as the server
refuses a replayed timestamp) until the probe's timeout. The first_byte phase runs from the
first send to the checked answer. Failures: nothing back is generic_timeout_error (the
measure's timeout); an ICMP port unreachable is connection_refused and an ICMP "prohibited"
(a firewall's REJECT) host_unreachable, but a plain host or network unreachable, which Linux
does not report on a UDP socket, ends as the timeout; an answer that is not the expected one
is protocol_error.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from noise.connection import Keypair, NoiseConnection
from noise.exceptions import NoiseInvalidMessage

from probe.config import Endpoint, PathSpec
from probe.errors import ProbeFailure
from probe.measure.dns import lookup, resolver_for
from probe.measure.sockets import bound_socket, check_bind
from probe.model import Trace

OPENVPN_HANDSHAKE = "openvpn_handshake"
WIREGUARD_HANDSHAKE = "wireguard_handshake"
PROTOCOL_ERROR = "protocol_error"
RESEND_S = 1.0
MAX_DATAGRAM = 2048

# OpenVPN's opcodes (src/openvpn/ssl_pkt.h): the high 5 bits of the first byte, the key id the low 3.
P_CONTROL_HARD_RESET_CLIENT_V2 = 7
P_CONTROL_HARD_RESET_SERVER_V2 = 8
P_ACK_V1 = 5

# WireGuard's handshake (https://www.wireguard.com/protocol/).
WG_CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
WG_IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
WG_LABEL_MAC1 = b"mac1----"
WG_INITIATION, WG_RESPONSE, WG_COOKIE_REPLY = 1, 2, 3
WG_RESPONSE_SIZE = 92
TAI64_BASE = 0x400000000000000A  # 2^62 + the 10 leap seconds TAI was ahead in 1972, as wg writes it


@dataclass(frozen=True, slots=True)
class TlsAuth:
    """OpenVPN's tls-auth: an HMAC and a replay counter between the session id and the rest."""

    send_key: bytes
    receive_key: bytes
    digest: str

    @property
    def size(self) -> int:
        return hashlib.new(self.digest).digest_size

    def wrap(self, header: bytes, rest: bytes, packet_id: int) -> bytes:
        replay = struct.pack("!II", packet_id, int(time.time()))
        mac = hmac.digest(self.send_key[: self.size], replay + header + rest, self.digest)
        return header + mac + replay + rest

    def unwrap(self, answer: bytes) -> bytes:
        header, mac, after = answer[:9], answer[9 : 9 + self.size], answer[9 + self.size :]
        replay, rest = after[:8], after[8:]
        expected = hmac.digest(self.receive_key[: self.size], replay + header + rest, self.digest)
        if len(replay) != 8 or not hmac.compare_digest(mac, expected):
            raise ProbeFailure(PROTOCOL_ERROR, OPENVPN_HANDSHAKE, "the answer's tls-auth HMAC is not the key's")
        return header + rest


def openvpn_reset(session: bytes, tls_auth: TlsAuth | None = None, packet_id: int = 1) -> bytes:
    """P_CONTROL_HARD_RESET_CLIENT_V2, key id 0: our session id, no acks, message packet id 0;
    with tls-auth, its HMAC and replay counter (`packet_id`) after the session id."""
    header = bytes([P_CONTROL_HARD_RESET_CLIENT_V2 << 3]) + session
    rest = b"\x00" + struct.pack("!I", 0)
    return header + rest if tls_auth is None else tls_auth.wrap(header, rest, packet_id)


def openvpn_answer_acks(answer: bytes, session: bytes, tls_auth: TlsAuth | None = None) -> bool:
    """The server's reset (or ack) acknowledging the packet we sent from `session`. Raises for
    anything else: a server that answers, but not as OpenVPN does."""
    opcode = answer[0] >> 3 if answer else None
    if tls_auth is not None and opcode in (P_CONTROL_HARD_RESET_SERVER_V2, P_ACK_V1):
        answer = tls_auth.unwrap(answer)
    if opcode not in (P_CONTROL_HARD_RESET_SERVER_V2, P_ACK_V1) or len(answer) < 10:
        raise ProbeFailure(PROTOCOL_ERROR, OPENVPN_HANDSHAKE, f"not an OpenVPN server's reset: {answer[:16].hex()}")
    acks = answer[9]
    ack_ids = answer[10 : 10 + 4 * acks]
    remote = answer[10 + 4 * acks : 18 + 4 * acks]
    if acks == 0 or len(remote) != 8:
        return False  # a reset that acknowledges nothing yet: wait for the one that does
    if remote != session or struct.pack("!I", 0) not in [ack_ids[i : i + 4] for i in range(0, len(ack_ids), 4)]:
        raise ProbeFailure(PROTOCOL_ERROR, OPENVPN_HANDSHAKE, "an OpenVPN answer acknowledging another session")
    return True


def _tai64n(now_ns: int) -> bytes:
    seconds, nanoseconds = divmod(now_ns, 1_000_000_000)
    return struct.pack("!QI", TAI64_BASE + seconds, nanoseconds)


def _hash(data: bytes) -> bytes:
    return hashlib.blake2s(data).digest()


def _mac(key: bytes, data: bytes) -> bytes:
    return hashlib.blake2s(data, digest_size=16, key=key).digest()


@dataclass
class WireGuardInitiation:
    """One handshake initiation and the Noise state that checks its response."""

    private_key: bytes
    server_public_key: bytes
    sender: int = field(default_factory=lambda: int.from_bytes(os.urandom(4), "little"))
    noise: NoiseConnection = field(init=False)

    def packet(self) -> bytes:
        self.noise = NoiseConnection.from_name(WG_CONSTRUCTION)
        self.noise.set_as_initiator()
        self.noise.set_prologue(WG_IDENTIFIER)
        self.noise.set_psks(psk=bytes(32))  # no preshared key: WireGuard's all-zero one
        self.noise.set_keypair_from_private_bytes(Keypair.STATIC, self.private_key)
        self.noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, self.server_public_key)
        self.noise.start_handshake()
        # e, es, s, ss and the timestamp: the ephemeral key, our static key and the time, sealed.
        body = struct.pack("<B3xI", WG_INITIATION, self.sender) + bytes(
            self.noise.write_message(_tai64n(time.time_ns()))
        )
        mac1 = _mac(_hash(WG_LABEL_MAC1 + self.server_public_key), body)
        return body + mac1 + bytes(16)  # no cookie: mac2 is zeros

    def answered(self, answer: bytes) -> bool:
        """True for this initiation's response, decrypted; False for another initiation's.
        Raises for anything a WireGuard server would not send."""
        kind, receiver = answer[:1], answer[8:12]
        if kind == bytes([WG_COOKIE_REPLY]) and len(answer) == 64 and answer[1:4] == bytes(3):
            # A server under load answers with a cookie first; its box (XChaCha20) stays shut.
            return answer[4:8] == struct.pack("<I", self.sender)
        if kind != bytes([WG_RESPONSE]) or len(answer) != WG_RESPONSE_SIZE or answer[1:4] != bytes(3):
            raise ProbeFailure(PROTOCOL_ERROR, WIREGUARD_HANDSHAKE, f"not a WireGuard response: {answer[:16].hex()}")
        if receiver != struct.pack("<I", self.sender):
            return False
        try:
            self.noise.read_message(answer[12:60])  # e, ee, se, psk and the empty payload's tag
        except (InvalidTag, NoiseInvalidMessage, ValueError) as exc:  # ValueError: X25519 refuses a low-order e
            raise ProbeFailure(
                PROTOCOL_ERROR, WIREGUARD_HANDSHAKE, "the response does not decrypt: not the server_public_key's server"
            ) from exc
        return True


async def probe_udp_endpoint(endpoint: Endpoint, path: PathSpec, trace: Trace) -> None:
    """Send the protocol's first message to the endpoint and wait for its checked answer; the
    measure's timeout ends the wait."""
    check_bind(path)
    address = (await lookup(resolver_for(path), endpoint.host, trace))[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = bound_socket(family, path, socket.SOCK_DGRAM)
    trace.fact("peer_address", address)
    try:
        if endpoint.protocol == "wireguard":
            await _wireguard(sock, (address, endpoint.port), endpoint, trace)
        else:
            keys = endpoint.tls_auth_keys
            tls_auth = TlsAuth(*keys, endpoint.tls_auth_digest.lower()) if keys else None
            await _openvpn(sock, (address, endpoint.port), tls_auth, trace)
    finally:
        sock.close()


async def _openvpn(sock: socket.socket, peer: tuple[str, int], tls_auth: TlsAuth | None, trace: Trace) -> None:
    trace.operation = OPENVPN_HANDSHAKE
    session = os.urandom(8)
    sent = 0

    def packet() -> bytes:  # a resend, as OpenVPN's own, counts on tls-auth's replay counter
        nonlocal sent
        sent += 1
        return openvpn_reset(session, tls_auth, sent)

    await _exchange(sock, peer, packet, lambda answer: openvpn_answer_acks(answer, session, tls_auth), trace)


async def _wireguard(sock: socket.socket, peer: tuple[str, int], endpoint: Endpoint, trace: Trace) -> None:
    trace.operation = WIREGUARD_HANDSHAKE
    private, public = endpoint.wireguard_keys
    sent: list[WireGuardInitiation] = []

    def fresh() -> bytes:
        sent.append(WireGuardInitiation(private, public))
        return sent[-1].packet()

    def answered(answer: bytes) -> bool:  # a late response to an earlier initiation counts too
        return any(initiation.answered(answer) for initiation in sent)

    await _exchange(sock, peer, fresh, answered, trace)


async def _exchange(
    sock: socket.socket,
    peer: tuple[str, int],
    packet: Callable[[], bytes],
    answered: Callable[[bytes], bool],
    trace: Trace,
) -> None:
    """Send, and again every RESEND_S, until `answered` takes a datagram; an ICMP error on the
    connected socket is raised by the kernel as the errno classify() maps."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_connect(sock, peer)
    started = time.perf_counter()
    while True:
        await loop.sock_sendall(sock, packet())
        try:
            async with asyncio.timeout(RESEND_S):
                while not answered(await loop.sock_recv(sock, MAX_DATAGRAM)):
                    pass
        except TimeoutError:
            continue
        trace.phase("first_byte", (time.perf_counter() - started) * 1000)
        return
