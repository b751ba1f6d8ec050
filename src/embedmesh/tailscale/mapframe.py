"""The framing of Tailscale's ``/machine/map`` stream, and its zstd compression, sans-IO.

Each MapResponse on the stream is ``[u32 little-endian length][body]``. The body is JSON, or a
zstd frame of JSON when the request asked for ``"Compress": "zstd"`` (Tailscale's clients always
ask, and always decode, so an uncompressed body reaches only clients that did not ask). The server
flushes after every message; a keep-alive is the message ``{"KeepAlive":true}``.

Go's client reads any length (up to 4 GiB) and decodes zstd without a size limit. Here both are
bounded, because the bytes come from the network: :class:`MapStreamReader` refuses a length over
``max_message_size`` as soon as it sees the four bytes, and :func:`decompress` refuses output over
``max_decoded_size`` before allocating it (a frame that declares its size, as Go's encoder always
does) or while decoding (one that does not). The window the decoder may allocate is capped too.
A body may hold zero or more zstd frames, skippable frames included, as Go's ``DecodeAll`` reads
it; a frame cut short is an error (the ``zstandard`` package's streaming reader would stop quietly).
"""

from __future__ import annotations

import struct
import threading

import zstandard

from embedmesh.tailscale.errors import TailscaleProtocolError

#: The largest length prefix a reader accepts by default. testcontrol refuses to send over 256 MiB;
#: a full map of 10,000 peers is well under 64 MiB of JSON before compression.
DEFAULT_MAX_MESSAGE_SIZE = 64 << 20
#: The most a body may decompress to by default.
DEFAULT_MAX_DECODED_SIZE = 256 << 20
#: zstd level 1 is what headscale uses (klauspost's SpeedFastest); Tailscale's own default is ~3.
DEFAULT_LEVEL = 1

#: The keep-alive message servers send every ~50 s when nothing else happened.
KEEPALIVE_JSON = b'{"KeepAlive":true}'

_LENGTH = struct.Struct("<I")
_ZSTD_MAGIC = 0xFD2FB528
_SKIPPABLE_MASK = 0xFFFFFFF0
_SKIPPABLE_MAGIC = 0x184D2A50
_FCS_SIZES = (0, 2, 4, 8)
_DICT_ID_SIZES = (0, 1, 2, 4)
# libzstd's largest window (2**31 on 64-bit builds) and smallest (2**10).
_MAX_WINDOW_LOG = 31
_MIN_WINDOW_LOG = 10
_MAX_BLOCK = 128 << 10


class MapFrameError(TailscaleProtocolError):
    """A map stream message is malformed, too large, or its zstd data is broken."""


def _window_cap(max_decoded_size: int) -> int:
    """The decoder's window limit: a power of two >= the output limit (Go's encoder writes
    single-segment frames, whose window is their whole content)."""
    log = max(_MIN_WINDOW_LOG, min(_MAX_WINDOW_LOG, max(1, max_decoded_size - 1).bit_length()))
    return 1 << log


def _frame_extent(data: memoryview, start: int) -> tuple[int, int | None, int, bool]:
    """Walk one zstd or skippable frame at ``start`` (RFC 8878 §3.1).

    Returns where it ends, its declared content size (None when not declared), the most its
    blocks can decode to, and whether it is a skippable frame. Raises :class:`MapFrameError`
    when it is cut short or not a frame.
    """
    end = len(data)
    if end - start < 4:
        raise MapFrameError("zstd data ends inside a frame magic number")
    (magic,) = struct.unpack_from("<I", data, start)
    if magic & _SKIPPABLE_MASK == _SKIPPABLE_MAGIC:
        if end - start < 8:
            raise MapFrameError("zstd skippable frame is cut short")
        (size,) = struct.unpack_from("<I", data, start + 4)
        stop = start + 8 + size
        if stop > end:
            raise MapFrameError("zstd skippable frame is cut short")
        return stop, 0, 0, True
    if magic != _ZSTD_MAGIC:
        raise MapFrameError("not zstd data (unknown frame magic)")
    pos = start + 4
    if pos >= end:
        raise MapFrameError("zstd frame header is cut short")
    descriptor = data[pos]
    pos += 1
    fcs_flag = descriptor >> 6
    single_segment = bool(descriptor & 0x20)
    if descriptor & 0x08:
        raise MapFrameError("zstd frame header sets a reserved bit")
    has_checksum = bool(descriptor & 0x04)
    fcs_size = 1 if fcs_flag == 0 and single_segment else _FCS_SIZES[fcs_flag]
    header_rest = (0 if single_segment else 1) + _DICT_ID_SIZES[descriptor & 0x03] + fcs_size
    if pos + header_rest > end:
        raise MapFrameError("zstd frame header is cut short")
    content_size: int | None = None
    if fcs_size:
        raw = bytes(data[pos + header_rest - fcs_size : pos + header_rest])
        content_size = int.from_bytes(raw, "little") + (256 if fcs_size == 2 else 0)
    pos += header_rest
    most = 0
    while True:
        if pos + 3 > end:
            raise MapFrameError("zstd frame is cut short (block header)")
        header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        pos += 3
        kind = (header >> 1) & 0x03
        if kind == 3:
            raise MapFrameError("zstd block of a reserved type")
        size = header >> 3
        # An RLE block stores one byte however long it expands; a compressed block regenerates
        # at most 128 KiB (Block_Maximum_Size).
        pos += 1 if kind == 1 else size
        most += _MAX_BLOCK if kind == 2 else size
        if pos > end:
            raise MapFrameError("zstd frame is cut short (block)")
        if header & 1:
            break
    if has_checksum:
        pos += 4
        if pos > end:
            raise MapFrameError("zstd frame is cut short (checksum)")
    return pos, content_size, most, False


def decompress(
    data: bytes | bytearray | memoryview, max_decoded_size: int = DEFAULT_MAX_DECODED_SIZE
) -> bytes:
    """Decode zero or more zstd frames (as Go's ``zstdframe.AppendDecode``), refusing more than
    ``max_decoded_size`` bytes of output. Raises :class:`MapFrameError`."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    decoder = zstandard.ZstdDecompressor(max_window_size=_window_cap(max_decoded_size))
    out = bytearray()
    pos = 0
    while pos < len(view):
        stop, content_size, most, skippable = _frame_extent(view, pos)
        frame = view[pos:stop]
        pos = stop
        if skippable:
            continue
        budget = max_decoded_size - len(out)
        if content_size is not None and content_size > budget:
            raise MapFrameError(
                f"zstd frame declares {content_size} bytes, over the {max_decoded_size}-byte limit"
            )
        if content_size is not None and content_size > most:
            # Checked before zstandard allocates the declared size for blocks that can't fill it.
            raise MapFrameError("zstd frame declares more content than its blocks hold")
        try:
            if content_size is not None:
                chunk = decoder.decompress(frame)
            else:
                # Without a declared size, zstandard grows its output only up to this bound.
                chunk = decoder.decompress(frame, max_output_size=budget + 1)
        except zstandard.ZstdError as exc:
            raise MapFrameError(
                f"zstd data is broken or decodes to over {max_decoded_size} bytes: {exc}"
            ) from None
        if len(chunk) > budget or (content_size is not None and len(chunk) != content_size):
            raise MapFrameError(f"zstd data decodes to over {max_decoded_size} bytes")
        out += chunk
    return bytes(out)


_compressors = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    """This thread's compressor for ``level``. A compression context keeps its buffers (hundreds
    of KiB after a large map), and every frame is independent, so one per thread serves every
    map stream instead of one per stream (10,000 streams would hold gigabytes)."""
    by_level: dict[int, zstandard.ZstdCompressor] | None = getattr(_compressors, "by_level", None)
    if by_level is None:
        by_level = _compressors.by_level = {}
    compressor = by_level.get(level)
    if compressor is None:
        compressor = by_level[level] = zstandard.ZstdCompressor(
            level=level, write_checksum=True, write_content_size=True
        )
    return compressor


class MapFrameEncoder:
    """Writes map stream messages: ``encode(json_body)`` returns the framed (maybe compressed) bytes.

    ``compress`` follows the request's ``Compress`` field (``"zstd"``: True). Frames carry their
    content size and a checksum, as Go's ``zstdframe.AppendEncode`` writes them. Frames are
    independent (no state carries from one to the next), so the same body always encodes to the
    same bytes.
    """

    __slots__ = ("compress", "level")

    def __init__(self, compress: bool = True, level: int = DEFAULT_LEVEL) -> None:
        self.compress = compress
        self.level = level

    def encode(self, body: bytes | bytearray | memoryview) -> bytes:
        """One message: the u32 little-endian length, then the body (zstd-compressed if asked)."""
        payload = _compressor(self.level).compress(bytes(body)) if self.compress else bytes(body)
        if len(payload) > 0xFFFFFFFF:
            raise ValueError("a map message body is at most 4 GiB")
        return _LENGTH.pack(len(payload)) + payload


class MapStreamReader:
    """Splits a ``/machine/map`` response body into messages (the client side).

    Feed the HTTP body to :meth:`receive_data`; it returns the JSON of every message the bytes
    complete, decompressed when ``compressed`` (the request said ``"Compress": "zstd"``). Raises
    :class:`MapFrameError` for an oversized length or broken zstd; the stream then stays broken.
    """

    __slots__ = ("_broken", "_buffer", "compressed", "max_decoded_size", "max_message_size")

    def __init__(
        self,
        *,
        compressed: bool = True,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_decoded_size: int = DEFAULT_MAX_DECODED_SIZE,
    ) -> None:
        self.compressed = compressed
        self.max_message_size = max_message_size
        self.max_decoded_size = max_decoded_size
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def pending(self) -> int:
        """Bytes held for a message not yet complete (0 at a clean message boundary)."""
        return len(self._buffer)

    def _fail(self, message: str) -> MapFrameError:
        self._broken = message
        self._buffer.clear()
        return MapFrameError(message)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Feed bytes; returns the JSON bodies of the messages they complete, in order."""
        if self._broken is not None:
            raise MapFrameError(f"map stream is broken: {self._broken}")
        buffer = self._buffer
        buffer += data
        out: list[bytes] = []
        offset = 0
        problem: str | None = None
        while len(buffer) - offset >= _LENGTH.size:
            (length,) = _LENGTH.unpack_from(buffer, offset)
            if length > self.max_message_size:
                problem = f"map message of {length} bytes exceeds the {self.max_message_size}-byte limit"
                break
            end = offset + _LENGTH.size + length
            if len(buffer) < end:
                break
            body = bytes(buffer[offset + _LENGTH.size : end])
            offset = end
            if self.compressed:
                try:
                    body = decompress(body, self.max_decoded_size)
                except MapFrameError as exc:
                    problem = str(exc)
                    break
            elif len(body) > self.max_decoded_size:
                problem = f"map message of {len(body)} bytes exceeds the {self.max_decoded_size}-byte limit"
                break
            out.append(body)
        if problem is not None:
            error = self._fail(problem)
            if not out:
                raise error
            # Hand over the good messages before the bad one; the next call reports it.
            return out
        del buffer[:offset]
        return out


__all__ = [
    "DEFAULT_LEVEL",
    "DEFAULT_MAX_DECODED_SIZE",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "KEEPALIVE_JSON",
    "MapFrameEncoder",
    "MapFrameError",
    "MapStreamReader",
    "decompress",
]
