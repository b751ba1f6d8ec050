"""DNS messages on the wire (RFC 1035 §4, EDNS0 from RFC 6891): the strict parsers of the query
path, and the few byte-level edits a forwarder makes to an upstream's response.

Everything that arrives from a client or an upstream is walked here first, iteratively, with hard
limits (255 bytes per name, 63 per label, a bounded number of compression pointers, pointers only
backwards), so no packet can loop, recurse or allocate its way past them. Only then does dnslib,
which builds our own answers, see anything. The parsers raise only :class:`ParseError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from embedmesh.errors import ParseError

# Record types and classes the resolver treats specially (RFC 1035 §3.2.2, RFC 3596, RFC 6891).
TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_HINFO = 13
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_IXFR = 251
TYPE_AXFR = 252
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

OPCODE_QUERY = 0

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5
#: Extended RCODE (RFC 6891 §6.1.3): the query's EDNS version is one we do not speak.
RCODE_BADVERS = 16

HEADER = struct.Struct("!HHHHHH")
QUESTION_TAIL = struct.Struct("!HH")
_RR_TAIL = struct.Struct("!HHIH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AD = 0x0020
FLAG_CD = 0x0010
#: The DNSSEC OK bit in the OPT record's TTL field (RFC 3225).
EDNS_FLAG_DO = 0x8000

MAX_NAME_LENGTH = 255
MAX_LABEL_LENGTH = 63
#: Compression pointers followed in one name. A name of at most 255 bytes has at most 127 labels,
#: so a legitimate encoder never needs more pointers than that.
MAX_POINTER_HOPS = 127
#: Largest UDP answer without EDNS (RFC 1035 §4.2.1).
CLASSIC_UDP_SIZE = 512
#: What this server advertises and honours at most over UDP: the 2020 DNS flag day value, which
#: fits a 1280-byte IPv6 packet (the tailnet MTU) with its headers.
EDNS_UDP_SIZE = 1232
#: Records per message the scanner accepts (a 64 KiB TCP message holds at most ~5,000 minimal RRs).
MAX_RECORDS = 6000

Name = tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Header:
    id: int
    flags: int
    qdcount: int
    ancount: int
    nscount: int
    arcount: int

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


@dataclass(frozen=True, slots=True)
class Question:
    #: Labels exactly as sent (case preserved); compare with :func:`lower_name`.
    name: Name
    qtype: int
    qclass: int


@dataclass(frozen=True, slots=True)
class Edns:
    """The OPT pseudo-record of a message (RFC 6891 §6.1.2)."""

    payload_size: int
    ext_rcode: int
    version: int
    flags: int

    @property
    def dnssec_ok(self) -> bool:
        return bool(self.flags & EDNS_FLAG_DO)


@dataclass(frozen=True, slots=True)
class Query:
    """A parsed query: one question, optional EDNS."""

    header: Header
    question: Question
    edns: Edns | None
    #: Where the question name ends in the message (it starts at offset 12).
    question_end: int

    @property
    def id(self) -> int:
        return self.header.id

    @property
    def recursion_desired(self) -> bool:
        return bool(self.header.flags & FLAG_RD)

    @property
    def checking_disabled(self) -> bool:
        return bool(self.header.flags & FLAG_CD)

    @property
    def dnssec_ok(self) -> bool:
        return self.edns is not None and self.edns.dnssec_ok

    def max_udp_size(self) -> int:
        """How large a UDP answer to this query may be: the client's EDNS payload size, never less
        than 512 (RFC 6891 §6.2.5) and never more than we advertise."""
        if self.edns is None:
            return CLASSIC_UDP_SIZE
        return max(CLASSIC_UDP_SIZE, min(self.edns.payload_size, EDNS_UDP_SIZE))


class QueryFormatError(ParseError):
    """The header parsed but the rest of the query did not: the answer is FORMERR."""

    def __init__(self, message: str, header: Header) -> None:
        super().__init__(message)
        self.header = header


@dataclass(frozen=True, slots=True)
class Record:
    """One resource record as the scanner found it (offsets into the message)."""

    section: int  # 1 answer, 2 authority, 3 additional
    name: Name
    rtype: int
    rclass: int
    ttl: int
    #: Offset of the 4-byte TTL field, so a cache can age the record in place.
    ttl_offset: int
    rdata_offset: int
    rdata_length: int
    #: The record's span in the message (owner name to end of rdata).
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Message:
    """A whole message walked and bounds-checked: header, questions and every record."""

    header: Header
    questions: tuple[Question, ...]
    records: tuple[Record, ...]
    edns: Edns | None
    #: Where the question section ends.
    question_end: int

    @property
    def rcode(self) -> int:
        """The full RCODE, with the 8 extended bits of the OPT record (RFC 6891 §6.1.3)."""
        high = self.edns.ext_rcode if self.edns is not None else 0
        return (high << 4) | self.header.rcode

    @property
    def truncated(self) -> bool:
        return bool(self.header.flags & FLAG_TC)

    def section(self, number: int) -> list[Record]:
        return [r for r in self.records if r.section == number]


# ---------------------------------------------------------------------------------------- names


def read_name(data: bytes | memoryview, offset: int) -> tuple[Name, int]:
    """The name at ``offset`` and the offset just after it (after the first pointer, if any)."""
    labels: list[bytes] = []
    size = 1  # the root label
    hops = 0
    end = -1
    position = offset
    length = len(data)
    while True:
        if position >= length:
            raise ParseError("DNS name runs past the end of the message")
        first = data[position]
        kind = first & 0xC0
        if kind == 0xC0:
            if position + 1 >= length:
                raise ParseError("DNS compression pointer runs past the end of the message")
            target = ((first & 0x3F) << 8) | data[position + 1]
            if end < 0:
                end = position + 2
            hops += 1
            # Pointers go strictly backwards (to a prior occurrence, RFC 1035 §4.1.4); with the
            # hop and length limits no chain can loop or grow without bound.
            if target >= position or hops > MAX_POINTER_HOPS:
                raise ParseError("DNS compression pointer loops or points forward")
            position = target
            continue
        if kind:
            raise ParseError(f"DNS label type 0x{kind:02x} is not supported")
        if first == 0:
            position += 1
            break
        label = bytes(data[position + 1 : position + 1 + first])
        if len(label) < first:
            raise ParseError("DNS label runs past the end of the message")
        size += first + 1
        if size > MAX_NAME_LENGTH:
            raise ParseError("DNS name longer than 255 bytes")
        labels.append(label)
        position += 1 + first
    return tuple(labels), end if end >= 0 else position


def encode_name(name: Name) -> bytes:
    """The uncompressed wire form of ``name``."""
    out = bytearray()
    for label in name:
        if not 0 < len(label) <= MAX_LABEL_LENGTH:
            raise ValueError(f"DNS label of {len(label)} bytes")
        out.append(len(label))
        out += label
    out.append(0)
    if len(out) > MAX_NAME_LENGTH:
        raise ValueError("DNS name longer than 255 bytes")
    return bytes(out)


def lower_name(name: Name) -> Name:
    """ASCII case folding only (RFC 4343): bytes outside A-Z are left alone."""
    return tuple(label.lower() for label in name)


def name_to_text(name: Name) -> str:
    """Presentation form without the trailing dot; unusual bytes escaped as ``\\DDD``."""
    return ".".join(_label_text(label) for label in name)


def _label_text(label: bytes) -> str:
    if all(33 <= c < 127 and c not in (0x2E, 0x5C) for c in label):
        return label.decode("ascii")
    return "".join(chr(c) if 33 <= c < 127 and c not in (0x2E, 0x5C) else f"\\{c:03d}" for c in label)


def text_to_name(text: str) -> Name:
    """``"db.mesh.internal"`` (trailing dot optional) to labels; ValueError for an invalid name."""
    text = text.rstrip(".") if text not in (".", "") else ""
    if not text:
        return ()
    labels = tuple(
        label.encode("idna") if not label.isascii() else label.encode() for label in text.split(".")
    )
    encode_name(labels)  # validates lengths
    return labels


# ---------------------------------------------------------------------------------------- parsing


def parse_header(data: bytes | memoryview) -> Header:
    if len(data) < HEADER.size:
        raise ParseError(f"DNS message of {len(data)} bytes is shorter than its header")
    return Header(*HEADER.unpack_from(data, 0))


def parse_query(data: bytes | memoryview) -> Query:
    """Parse a query as a server receives it.

    Raises :class:`ParseError` when there is no header (drop it), and :class:`QueryFormatError`
    (carrying the header) when the header is there but the rest is malformed: that deserves FORMERR.
    Responses are not queries: the caller checks ``header.is_response`` and drops them.
    """
    header = parse_header(data)
    try:
        if header.qdcount != 1:
            # RFC 9619: a query has exactly one question.
            raise ParseError(f"a query must carry one question, not {header.qdcount}")
        if header.ancount or header.nscount:
            raise ParseError("a query carries no answer or authority records")
        name, offset = read_name(data, HEADER.size)
        if offset + QUESTION_TAIL.size > len(data):
            raise ParseError("DNS question runs past the end of the message")
        qtype, qclass = QUESTION_TAIL.unpack_from(data, offset)
        question_end = offset + QUESTION_TAIL.size
        records, _ = _read_records(data, question_end, 0, 0, header.arcount)
        edns = _edns_of(data, records)
    except QueryFormatError:
        raise
    except ParseError as exc:
        raise QueryFormatError(str(exc), header) from None
    return Query(header, Question(name, qtype, qclass), edns, question_end)


def parse_message(data: bytes | memoryview) -> Message:
    """Walk a whole message (an upstream's response): every name, every record, every bound."""
    header = parse_header(data)
    if header.qdcount > 1:
        raise ParseError(f"DNS message with {header.qdcount} questions")
    offset = HEADER.size
    questions: list[Question] = []
    for _ in range(header.qdcount):
        name, offset = read_name(data, offset)
        if offset + QUESTION_TAIL.size > len(data):
            raise ParseError("DNS question runs past the end of the message")
        qtype, qclass = QUESTION_TAIL.unpack_from(data, offset)
        offset += QUESTION_TAIL.size
        questions.append(Question(name, qtype, qclass))
    records, _ = _read_records(data, offset, header.ancount, header.nscount, header.arcount)
    return Message(header, tuple(questions), tuple(records), _edns_of(data, records), offset)


def _read_records(
    data: bytes | memoryview, offset: int, ancount: int, nscount: int, arcount: int
) -> tuple[list[Record], int]:
    if ancount + nscount + arcount > MAX_RECORDS:
        raise ParseError("DNS message claims more records than it can hold")
    records: list[Record] = []
    for section, count in ((1, ancount), (2, nscount), (3, arcount)):
        for _ in range(count):
            start = offset
            name, offset = read_name(data, offset)
            if offset + _RR_TAIL.size > len(data):
                raise ParseError("DNS record runs past the end of the message")
            rtype, rclass, ttl, rdlength = _RR_TAIL.unpack_from(data, offset)
            ttl_offset = offset + 4
            offset += _RR_TAIL.size
            if offset + rdlength > len(data):
                raise ParseError("DNS record data runs past the end of the message")
            records.append(
                Record(
                    section, name, rtype, rclass, ttl, ttl_offset, offset, rdlength, start, offset + rdlength
                )
            )
            offset += rdlength
    return records, offset


def _edns_of(data: bytes | memoryview, records: list[Record]) -> Edns | None:
    opts = [r for r in records if r.rtype == TYPE_OPT]
    if not opts:
        return None
    if len(opts) > 1:
        raise ParseError("more than one OPT record (RFC 6891 §6.1.1)")
    opt = opts[0]
    if opt.section != 3 or opt.name:
        raise ParseError("the OPT record must be in the additional section and owned by the root")
    # Options (RFC 6891 §6.1.2) must tile the RDATA exactly.
    position, end = opt.rdata_offset, opt.rdata_offset + opt.rdata_length
    while position < end:
        if position + 4 > end:
            raise ParseError("truncated EDNS option")
        (length,) = _U16.unpack_from(data, position + 2)
        position += 4 + length
        if position > end:
            raise ParseError("EDNS option runs past its record")
    ttl = opt.ttl
    return Edns(opt.rclass, ttl >> 24, (ttl >> 16) & 0xFF, ttl & 0xFFFF)


# ---------------------------------------------------------------------------------------- edits


def header_only(query_header: Header, rcode: int) -> bytes:
    """A response with no question (for FORMERR, when the question itself is what's broken)."""
    flags = FLAG_QR | (query_header.flags & (0x7800 | FLAG_RD | FLAG_CD)) | FLAG_RA | (rcode & 0xF)
    return HEADER.pack(query_header.id, flags, 0, 0, 0, 0)


def opt_record(payload_size: int = EDNS_UDP_SIZE, *, ext_rcode: int = 0, flags: int = 0) -> bytes:
    """Our OPT pseudo-record: owner root, our payload size, version 0, no options."""
    return b"\x00" + struct.pack("!HHIH", TYPE_OPT, payload_size, (ext_rcode << 24) | flags, 0)


def without_records(data: bytes, message: Message, drop: list[Record]) -> bytes:
    """``data`` with the records in ``drop`` removed (their spans cut out, counts adjusted).

    Only safe for records that no compression pointer targets, such as OPT (owned by the root).
    """
    out = bytearray()
    cursor = 0
    counts = [message.header.ancount, message.header.nscount, message.header.arcount]
    for record in sorted(drop, key=lambda r: r.start):
        out += data[cursor : record.start]
        cursor = record.end
        counts[record.section - 1] -= 1
    out += data[cursor:]
    struct.pack_into("!HHH", out, 6, *counts)
    return bytes(out)
