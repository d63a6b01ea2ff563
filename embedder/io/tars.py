"""WebDataset tar shards as a source: ``shards/*.tar``, brace ranges ``shards/{00000..00099}.tar``,
local or in object storage.

A shard is a tar, plain or gzip'd (``.tar.gz``, ``.tgz``), whose members are grouped into samples by
key (the member name up to the first dot of its file name: ``000031234.jpg``, ``000031234.txt``,
``000031234.json`` are one sample), as img2dataset writes them. Each sample's image is located as ``SHARD#MEMBER``
(``/data/shards/00003.tar#000031234.jpg``): its id is a hash of that location, so a rerun skips what a
store holds and a killed run resumes with every sample exactly once. Discovery reads the shard's
headers once, in order (tarfile; no member is extracted to disk) and the small members that carry a
label (``.cls``, or the ``label`` key of ``.json``) or a caption (``.txt``), and records where each
image's bytes lie: the location it gives decoding is ``SHARD#MEMBER#@OFFSET:SIZE`` (the span is not
part of the id: ``embedder.io.location``). Decoding reads exactly that range (one ranged GET per
image in object storage; the 512-byte header just before it is read too and checked, so a shard
rewritten since discovery is walked again rather than misread), through the same decode path as a
file's; a location without a span is found by walking the headers once per process.

Bounded before anything is read: a label, caption or JSON member over ``MAX_METADATA_BYTES`` (1 MiB)
or an image member over ``MAX_IMAGE_BYTES`` (20 MiB, the service's upload limit too) makes that
sample a recorded failure.

A gzip'd shard has no offsets to seek to: it is decompressed as a stream, members read in order
(``_Gunzipped``); decoding shares a process's streams of a shard between its threads (``_Cursors``),
so threads reading in order decompress it once per process; a member read out of order (the
service, one image) decompresses up to it.

Nothing bad is dropped silently: a sample with no image member, a key that repeats within a shard,
a member over its limit, or a shard cut short become failing locations (``SHARD#!KEY!reason``) that
decoding records in the store's errors table with the reason. A cut keeps only the samples whose
members all came before it: the sample in progress at the cut is left out (named in the recorded
reason), so once the shard is complete a rerun embeds it with its label.
"""

from __future__ import annotations

import json
import re
import tarfile
import threading
import zlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from embedder.errors import DecodeError, SourceError
from embedder.io import location
from embedder.io.limits import MAX_IMAGE_BYTES, MAX_METADATA_BYTES, too_big
from embedder.io.location import TAR_SUFFIXES, Location
from embedder.io.uri import filesystem, is_uri

GZ_SUFFIXES = (".tar.gz", ".tgz")
UNKNOWN_SIZE = 1 << 62  # a gzip'd shard's length is known only once it is decompressed
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
METADATA_EXTS = ("cls", "txt", "json")  # read at discovery: bounded by MAX_METADATA_BYTES
_KEY = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's own split: dir/KEY . ext
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass(frozen=True)
class Sample:
    locator: str  # SHARD#MEMBER#@OFFSET:SIZE (or SHARD#!KEY!reason: recorded as a failure)
    label: str | None
    caption: str | None


def is_shard(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def is_gzipped(path: str) -> bool:
    return path.lower().endswith(GZ_SUFFIXES)


def expand_braces(pattern: str) -> list[str]:
    """``shards/{00000..00003}.tar`` → the four names, zero-padding kept (webdataset's notation)."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    if int(hi) < int(lo):
        raise SourceError(f"brace range {{{lo}..{hi}}} in {pattern!r} runs backwards")
    if int(hi) - int(lo) > 1_000_000:
        raise SourceError(f"brace range {{{lo}..{hi}}} in {pattern!r} names over a million shards")
    width = len(lo) if lo.startswith("0") else 0
    out = []
    for i in range(int(lo), int(hi) + 1):
        out.extend(expand_braces(pattern[:m.start()] + str(i).zfill(width) + pattern[m.end():]))
    return out


WINDOW = 8 << 20  # object storage: bytes per ranged read (headers and members served from it)


class _Windowed:
    """A seekable file over object storage whose reads are ranged GETs of WINDOW bytes: walking a
    shard's headers, or reading its members in order, costs one request per window instead of one
    per header or member."""

    def __init__(self, f: Any, size: int, window: int = WINDOW) -> None:
        self.f, self.size, self.window = f, size, window
        self.pos, self.start, self.buf = 0, 0, b""

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else self.size + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end - self.pos > self.window:  # a member larger than a window: read it whole
            out = bytes(self.f.read_at(end - self.pos, self.pos))
        else:
            if not (self.start <= self.pos and end <= self.start + len(self.buf)):
                self.start = self.pos
                self.buf = bytes(self.f.read_at(min(self.window, self.size - self.pos), self.pos))
            out = self.buf[self.pos - self.start:end - self.start]
        self.pos = end
        return out

    def close(self) -> None:
        self.f.close()


class _Gunzipped:
    """A gzip'd shard as a seekable file of its tar bytes: reading forward decompresses (what is
    skipped is decompressed and dropped), the last KEEP bytes are kept so a sample's small members,
    just behind, are read again from memory; further back it starts over (gzip has no index)."""

    KEEP = 16 << 20

    def __init__(self, raw: Any) -> None:
        import gzip

        self.raw = raw
        self.gz = gzip.GzipFile(fileobj=raw, mode="rb")
        self.want = 0  # where the next read starts
        self.at = 0  # how far the stream is decompressed
        self.tail = bytearray()  # the decompressed bytes just before ``at``

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence != 0:
            raise OSError("a gzip'd shard is read by absolute offsets")
        self.want = pos
        return pos

    def tell(self) -> int:
        return self.want

    def _advance(self, n: int) -> bytes:
        data = self.gz.read(n)
        self.at += len(data)
        self.tail += data
        if len(self.tail) > 2 * self.KEEP:
            del self.tail[:len(self.tail) - self.KEEP]
        return data

    def read(self, n: int = -1) -> bytes:
        tail_start = self.at - len(self.tail)
        if self.want < tail_start:  # behind what is kept: start over
            self.gz.rewind()
            self.at, self.tail = 0, bytearray()
        while self.at < self.want:  # skip forward, decompressing
            if not self._advance(min(self.want - self.at, 1 << 20)):
                return b""
        out = b""
        if self.want < self.at:  # from memory, then the stream
            start = len(self.tail) - (self.at - self.want)
            out = bytes(self.tail[start:start + (n if n >= 0 else len(self.tail))])
        if n < 0:  # the rest of the stream
            while chunk := self._advance(1 << 20):
                out += chunk
        elif len(out) < n:
            out += self._advance(n - len(out))
        self.want += len(out)
        return out

    def close(self) -> None:
        self.gz.close()
        self.raw.close()

    def __del__(self) -> None:  # a decode thread's held stream ends with its thread
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: nothing left to close with
            pass


GZIP_ERRORS: tuple[type[Exception], ...] = (EOFError, OSError, zlib.error)  # a cut or damaged gzip stream
TAR_ERRORS: tuple[type[Exception], ...] = (tarfile.ReadError, *GZIP_ERRORS)


def _open(path: str) -> tuple[IO[bytes], int]:
    """A seekable binary file and its size, local or in object storage (windowed reads); a gzip'd
    shard's tar bytes, as a stream, with its size unknown."""
    if is_gzipped(path):
        raw, _ = _open_raw(path)
        return _Gunzipped(raw), UNKNOWN_SIZE  # type: ignore[return-value]
    return _open_raw(path)


def _open_raw(path: str) -> tuple[IO[bytes], int]:
    if is_uri(path):
        fs, key = filesystem(path)
        try:
            f = fs.open_input_file(key)  # type: ignore[attr-defined]
        except (OSError, FileNotFoundError) as e:
            raise SourceError(f"cannot open shard {path}: {str(e).splitlines()[0][:200]}") from None
        size = int(f.size())
        return _Windowed(f, size), size  # type: ignore[return-value]
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the caller
    except OSError as e:
        raise SourceError(f"cannot open shard {path}: {e.strerror or e}") from None
    f.seek(0, 2)
    size = f.tell()
    f.seek(0)
    return f, size


class _NotPlain(Exception):
    """A header the fast reader leaves to tarfile (GNU long names, pax, base-256 sizes)."""


@dataclass(frozen=True)
class Stop:
    """Why a shard's members end early (cut short, damaged), and the member cut, when known: the
    samples before it are kept, the one it belongs to (or, unknown, the one in progress) is not."""

    reason: str
    member: str | None = None


Member = tuple[str, int, int]  # name, data offset, size


def _padded(length: int) -> int:
    return -(-length // 512) * 512


def _plain_members(f: IO[bytes], size: int) -> Iterator[Member | Stop]:
    """ustar / v7 headers read directly: 512 bytes, name, octal size, type, checksum checked.
    Measured on 3,000-sample shards: tarfile's parser costs ~50 µs per member in Python, this ~5.
    A tar that ends without its end-of-archive blocks was cut (maybe between two members of one
    sample): a Stop."""
    pos = 0
    last: str | None = None
    while pos + 512 <= size:
        f.seek(pos)
        hdr = f.read(512)
        if len(hdr) < 512:
            break
        if hdr.count(0) == 512:
            return  # end of archive
        try:
            stored = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            length = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        except ValueError:
            raise _NotPlain from None
        if hdr[124] & 0x80 or stored != sum(hdr) - sum(hdr[148:156]) + 256:
            raise _NotPlain  # base-256 size, or a checksum tarfile should judge
        kind = hdr[156:157]
        if kind in (b"L", b"K", b"x", b"g"):
            raise _NotPlain
        name = hdr[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if hdr[257:262] == b"ustar" and hdr[345] != 0:
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape") + "/" + name
        data = pos + 512
        if kind in (b"0", b"\0", b"7"):
            if data + length > size:
                yield Stop(f"cut short inside {name} ({size:,} bytes of the {data + length:,} it needs)", name)
                return
            yield name, data, length
        last = name
        pos = data + _padded(length)
    if size == UNKNOWN_SIZE:  # a stream: did it end inside the last member, or after it?
        if pos > 0 and len(_read_at(f, pos - 1, 1)) < 1:
            yield Stop(f"cut short inside {last}", last)
            return
        yield Stop(f"cut short after {last} (no end-of-archive blocks)" if last else "empty, not a tar")
        return
    f.seek(pos)
    if pos < size and f.read(size - pos).count(0) == size - pos:
        return  # zeros to the end: a shorter end-of-archive than two blocks
    if pos < size:
        yield Stop(f"cut short inside a header ({size:,} bytes, the last header at {pos:,} incomplete)")
    else:
        yield Stop(f"cut short after {last} (no end-of-archive blocks)" if last else "empty, not a tar")


def _members(f: IO[bytes], size: int) -> Iterator[Member | Stop]:
    """(name, data offset, size) per regular member in order; a trailing Stop says why the shard
    stopped early (cut short, or damaged). Plain headers are read directly; a shard with another
    kind is read by tarfile from its start."""
    done = 0
    try:
        for m in _plain_members(f, size):
            done += not isinstance(m, Stop)
            yield m
        return
    except _NotPlain:
        pass
    except GZIP_ERRORS as e:  # a gzip'd shard cut short or damaged: what came before is kept
        yield Stop(f"gzip stream damaged or cut short ({type(e).__name__}: {e})")
        return
    f.seek(0)
    try:
        tf = tarfile.open(fileobj=f, mode="r:")  # type: ignore[call-overload]
    except TAR_ERRORS as e:
        yield Stop(f"not a readable tar ({e})")
        return
    seen = 0
    while True:
        try:
            info = tf.next()
        except TAR_ERRORS as e:
            yield Stop(f"damaged after the last good member ({type(e).__name__}: {e})")
            return
        if info is None:
            try:
                f.seek(tf.offset)
                end = f.read(512)
            except GZIP_ERRORS as e:
                yield Stop(f"gzip stream damaged or cut short ({type(e).__name__}: {e})")
                return
            if len(end) < 512 or end.count(0) != 512:  # tarfile reads a cut tar as a shorter one
                yield Stop(f"cut short at byte {tf.offset:,} (no end-of-archive blocks)")
            return
        if not info.isreg():
            continue
        if info.offset_data + info.size > size:
            yield Stop(f"cut short inside {info.name} ({size:,} bytes of the {info.offset_data + info.size:,} "
                       "it needs)", info.name)
            return
        seen += 1
        if seen > done:  # what the fast reader already gave is not given twice
            yield info.name, info.offset_data, info.size


def _read_at(f: IO[bytes], offset: int, size: int) -> bytes:
    f.seek(offset)
    return f.read(size)


def _label_of(members: dict[str, tuple[int, int]], f: IO[bytes], label_key: str) -> str | None:
    if "cls" in members:
        text = _read_at(f, *members["cls"]).decode("utf-8", "replace").strip()
        return text or None
    if "json" in members:
        try:
            meta: Any = json.loads(_read_at(f, *members["json"]))
        except (ValueError, UnicodeDecodeError):
            return None
        if isinstance(meta, dict) and meta.get(label_key) is not None:
            return str(meta[label_key])
    return None


def _over_limit(group: dict[str, tuple[int, int]], names: dict[str, str], image: str) -> str | None:
    """Why a sample's members are too big to read (checked before any is read), or None."""
    for ext in METADATA_EXTS:
        if ext in group and group[ext][1] > MAX_METADATA_BYTES:
            return (f"{names[ext]} is {group[ext][1]:,} bytes, over the {MAX_METADATA_BYTES:,}-byte limit "
                    "of a label, caption or JSON member: the sample is not embedded")
    return None  # the image member's size is checked where it is read (``read_member``'s limit)


def iter_samples(shard: str, label_key: str = "label") -> Iterator[Sample]:
    """The samples of one shard, in order (see the module's docstring)."""
    f, size = _open(shard)
    try:
        seen: set[str] = set()
        key: str | None = None
        group: dict[str, tuple[int, int]] = {}
        names: dict[str, str] = {}

        def flush() -> Iterator[Sample]:
            if key is None:
                return
            if key in seen:
                yield Sample(location.failing(shard, key, f"duplicate key {key} in this shard: the later sample "
                                              "is not embedded"), None, None)
                return
            seen.add(key)
            image = next((e for e in IMAGE_EXTS if e in group), None)
            if image is None:
                shown = sorted(names.values())
                listed = ", ".join(shown[:10]) + (f", … {len(shown) - 10:,} more" if len(shown) > 10 else "")
                yield Sample(location.failing(shard, key, f"sample {key} has no image member ({listed})"), None, None)
                return
            too_big = _over_limit(group, names, image)
            if too_big is not None:
                yield Sample(location.failing(shard, key, too_big), None, None)
                return
            caption = None
            if "txt" in group:
                caption = _read_at(f, *group["txt"]).decode("utf-8", "replace").strip() or None
            offset, length = group[image]
            yield Sample(location.member(shard, names[image], offset, length), _label_of(group, f, label_key),
                         caption)

        for m in _members(f, size):
            if isinstance(m, Stop):
                cut_key = None
                if m.member is not None and (km := _KEY.match(m.member)) is not None:
                    cut_key = km.group(1)
                left = ""
                if key is not None and (m.member is None or cut_key == key):
                    left = f" (sample {key}, in progress at the cut, is left out)"  # its label may come after
                else:
                    yield from flush()
                key = None
                yield Sample(location.failing(shard, "end", f"shard {m.reason}; the samples before it are kept{left}"),
                             None, None)
                return
            name, offset, length = m
            km = _KEY.match(name)
            if km is None:
                continue  # no extension at all: not part of any sample
            k, ext = km.group(1), km.group(2).lower()
            if k != key:
                yield from flush()
                key, group, names = k, {}, {}
            if ext in group:  # the same member twice: a repeated key
                yield from flush()
                key, group, names = k, {}, {}
            group[ext] = (offset, length)
            names[ext] = name
        yield from flush()
    finally:
        f.close()


# ---- reading a sample's image back by its location -----------------------------------------------
_INDEX_CACHE: OrderedDict[str, dict[str, tuple[int, int]]] = OrderedDict()
_INDEX_LOCK = threading.Lock()
INDEXES_KEPT = 4  # shards whose member offsets a process keeps (a few KB per thousand members)


def _index(shard: str, fresh: bool = False) -> dict[str, tuple[int, int]]:
    """Every member's (offset, size), by walking the headers: only for a location without a span
    (written before spans were recorded) or whose span no longer matches the shard. FRESH: walk
    again rather than use the index kept (the caller found a member's header elsewhere)."""
    with _INDEX_LOCK:
        hit = None if fresh else _INDEX_CACHE.get(shard)
        if hit is not None:
            _INDEX_CACHE.move_to_end(shard)
            return hit
    f, size = _open(shard)
    try:
        index = {m[0]: (m[1], m[2]) for m in _members(f, size) if not isinstance(m, Stop)}
    finally:
        f.close()
    with _INDEX_LOCK:
        _INDEX_CACHE[shard] = index
        while len(_INDEX_CACHE) > INDEXES_KEPT:
            _INDEX_CACHE.popitem(last=False)
    return index


def _header_matches(hdr: bytes, member: str, size: int) -> bool:
    """Is HDR the tar header of MEMBER, SIZE bytes long? (checksum, size, and the name field, which
    holds the name, its first 100 bytes, its last part after a ustar prefix, or under a pax header
    its ASCII form)."""
    if len(hdr) != 512:
        return False
    try:
        stored = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        length = int(hdr[124:136].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    name = hdr[:100].split(b"\0", 1)[0]
    if not (stored == sum(hdr) - sum(hdr[148:156]) + 256 and length == size and name):
        return False
    prefix = hdr[345:500].split(b"\0", 1)[0] if hdr[257:262] == b"ustar" else b""
    full = prefix + b"/" + name if prefix else name
    for want in (member.encode("utf-8", "surrogateescape"), member.encode("ascii", "replace")):  # pax: ASCII
        # the whole name; or, for a name longer than the field (GNU longname, pax), its first bytes
        if full == want or (len(name) >= 99 and want.startswith(name)):
            return True
    return False


def read_member(locator: str | Location, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The bytes at ``SHARD#MEMBER[#@OFFSET:SIZE]``; a failing location raises DecodeError with its
    reason. With a span: that range and the header before it, in one read; without one (or when the
    header there is not the member's: the shard was rewritten), the member found by its headers."""
    loc = location.parse(locator) if isinstance(locator, str) else locator
    if loc is None:
        raise DecodeError(f"{locator} is not a shard's member")
    if loc.kind == location.FAILING:
        raise DecodeError(loc.reason or "not embedded")
    shard, member = loc.container, loc.member
    try:
        if loc.offset is not None and loc.size is not None and loc.offset >= 512:
            if loc.size > max_bytes:
                raise DecodeError(too_big(member, loc.size, max_bytes))
            data = _read_span(shard, loc.offset - 512, loc.size + 512)
            if _header_matches(data[:512], member, loc.size) and len(data) == loc.size + 512:
                return data[512:]
        for fresh in (False, True):  # a kept index may be of the shard before it was rewritten: walk again
            try:
                offset, size = _index(shard, fresh)[member]
            except KeyError:
                if not fresh:
                    continue
                raise DecodeError(f"{member} is not in shard {shard}") from None
            if size > max_bytes:
                raise DecodeError(too_big(member, size, max_bytes))
            data = _read_span(shard, offset - 512, size + 512)
            if _header_matches(data[:512], member, size):
                data = data[512:]
                break
        else:
            raise DecodeError(f"{member}'s header in {shard} is not where its headers say: "
                              "the shard changed while read")
    except SourceError as e:  # a shard moved or deleted since discovery: that image fails, the run goes on
        raise DecodeError(str(e)) from None
    except GZIP_ERRORS as e:
        raise DecodeError(f"{member}: gzip stream damaged or cut short ({type(e).__name__}: {e})") from None
    if len(data) != size:
        raise DecodeError(f"{shard} ends inside {member} ({len(data):,} of {size:,} bytes)")
    return data


def _read_span(shard: str, offset: int, size: int) -> bytes:
    """SIZE bytes at OFFSET of SHARD's tar bytes: one ranged read of a plain shard (object storage:
    through this thread's handle on it); a gzip'd one through the process's streams of it."""
    if is_gzipped(shard):
        return _cursors(shard).read(offset, size)
    if is_uri(shard):
        held = getattr(_THREAD, "shard", None)
        if held is None or held[0] != shard:
            if held is not None:
                held[1].close()
            _THREAD.shard = None
            fs, key = filesystem(shard)
            try:
                f = fs.open_input_file(key)  # type: ignore[attr-defined]
            except (OSError, FileNotFoundError) as e:
                raise SourceError(f"cannot open shard {shard}: {str(e).splitlines()[0][:200]}") from None
            _THREAD.shard = held = (shard, f)
        n = max(0, min(size, int(held[1].size()) - offset))
        return bytes(held[1].read_at(n, offset)) if n else b""
    try:
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except OSError as e:
        raise SourceError(f"cannot open shard {shard}: {e.strerror or e}") from None


class _Cursors:
    """A process's decompressing streams of one gzip'd shard, shared by its threads: a read waits
    for the stream that reaches its offset with the least decompressing (the one the previous
    member's read left just behind, when threads read in order: the shard is decompressed once per
    process), and opens another only for an offset behind every stream's kept tail (out of order);
    at most KEPT streams are kept (each holds up to 2 × ``_Gunzipped.KEEP`` bytes)."""

    KEPT = 2

    def __init__(self, shard: str) -> None:
        self.shard = shard
        self.streams: list[tuple[threading.Lock, _Gunzipped]] = []
        self.lock = threading.Lock()

    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            usable = [s for s in self.streams if s[1].at - len(s[1].tail) <= offset]
            pick = min(usable, key=lambda s: max(0, offset - s[1].at)) if usable else None
            if pick is None:
                raw, _ = _open_raw(self.shard)
                pick = (threading.Lock(), _Gunzipped(raw))
                self.streams.append(pick)
                while len(self.streams) > self.KEPT:  # the one furthest behind goes (closed when unused)
                    self.streams.sort(key=lambda s: s[1].at)
                    self.streams.pop(0)
        lock, g = pick
        with lock:
            g.seek(offset)
            return g.read(size)


_CURSORS: OrderedDict[str, _Cursors] = OrderedDict()
CURSOR_SHARDS_KEPT = 2  # gzip'd shards whose streams a process keeps open


def _cursors(shard: str) -> _Cursors:
    with _INDEX_LOCK:
        c = _CURSORS.get(shard)
        if c is None:
            c = _CURSORS[shard] = _Cursors(shard)
            while len(_CURSORS) > CURSOR_SHARDS_KEPT:
                _CURSORS.popitem(last=False)  # its streams close when no thread reads them
        else:
            _CURSORS.move_to_end(shard)
        return c


_THREAD = threading.local()
