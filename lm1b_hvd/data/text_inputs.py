"""The user's text files as `prepare_data text` reads them: plain, or compressed as corpora come
(gzip, bzip2 or xz, by the name's suffix, with the standard library's readers), or standard
input ('-'); in UTF-8, with or without a byte-order mark, or in UTF-16 with its mark.

Every way a file can fail to be text becomes a PrepareError naming the file: it cannot be
opened, it is binary, its compressed data is damaged or ends early (an interrupted download), or
its UTF-16 is broken. A damaged file is found while it is read, which may be late in a long run;
prepare_data's work folder keeps that from leaving anything behind.

A UTF-8 mark at a file's start is not text and is dropped (else it would become a word of its
own). A UTF-16 file is read as UTF-16 and its lines passed on in UTF-8 (docs/design.md, "Your
own text": Windows tools write it, and its mark says what it is beyond doubt).
"""
import bz2
import dataclasses
import gzip
import io
import lzma
import os
import shutil
import sys
import zlib

from lm1b_hvd import console

STDIN = "-"
COMPRESSIONS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}  # by the name's suffix
READERS = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}  # each takes an open file
UTF8_MARK = b"\xef\xbb\xbf"
UTF16_MARKS = (b"\xff\xfe", b"\xfe\xff")
BINARY_PROBE = 8192  # bytes of a file looked at for a NUL
# What the readers raise on damaged data: gzip's BadGzipFile and bz2's "Invalid data stream" are
# OSErrors, an early end an EOFError, a bad block zlib.error or lzma.LZMAError.
DAMAGED = (EOFError, OSError, zlib.error, lzma.LZMAError)


class PrepareError(console.UserError):
    """Input or an output folder that `prepare_data text` cannot use."""


@dataclasses.dataclass(frozen=True)
class TextInput:
    """One input as read: `path` on disk (standard input is copied to a file first), `name` as
    the user gave it ('-' for standard input), its compression and its encoding."""
    path: str
    name: str
    compression: str = "none"
    encoding: str = "utf-8"  # utf-8 | utf-8 with a mark | utf-16

    def record(self):
        """What prepare.json says was read."""
        return {"input": os.path.basename(self.name), "compression": self.compression, "encoding": self.encoding,
                "bytes": os.path.getsize(self.path)}


def compression_of(path):
    return COMPRESSIONS.get(os.path.splitext(path)[1].lower(), "none")


def copy_standard_input(folder):
    """Standard input, copied to a file in `folder` (it can be read only once, and is read twice):
    its path."""
    path = os.path.join(folder, "standard-input")
    with open(path, "wb") as handle:
        shutil.copyfileobj(sys.stdin.buffer, handle, 1 << 20)
    return path


def examine(path, name=None):
    """The TextInput of the file at `path` (given as `name`), from its first bytes; a file that
    cannot be read, is damaged at its start or is binary is a PrepareError."""
    name = name or path
    compression = compression_of(path) if name != STDIN else "none"
    with _opened(path, name) as raw:
        try:
            head = _decompressed(raw, compression).read(BINARY_PROBE)
        except DAMAGED as err:
            raise _damaged(name, compression, err) from None
    if head.startswith(UTF16_MARKS):
        return TextInput(path, name, compression, "utf-16")
    if b"\0" in head:
        raise PrepareError(f"{name}: a binary file (a NUL byte in its first {BINARY_PROBE:,} bytes), not text")
    return TextInput(path, name, compression, "utf-8 with a mark" if head.startswith(UTF8_MARK) else "utf-8")


def lines(text_input):
    """(a line in UTF-8 bytes, how far into the file on disk) for each line of `text_input`."""
    name, compression = text_input.name, text_input.compression
    with _opened(text_input.path, name) as raw:
        source = _decompressed(raw, compression)
        reader = io.TextIOWrapper(source, encoding="utf-16") if text_input.encoding == "utf-16" else source
        first = True
        try:
            for line in reader:
                if isinstance(line, str):
                    line = line.encode("utf-8", "surrogatepass")
                elif first and line.startswith(UTF8_MARK):
                    line = line[len(UTF8_MARK):]
                first = False
                yield line, raw.tell()
        except UnicodeDecodeError as err:
            raise PrepareError(f"{name}: not UTF-16 after its byte-order mark ({err.reason}); convert it to "
                               "UTF-8 first: iconv -f UTF-16 -t UTF-8 IN > OUT") from None
        except DAMAGED as err:
            raise _damaged(name, compression, err) from None


def _opened(path, name):
    """The file at `path`, open for reading bytes; one that cannot be opened is a PrepareError naming it."""
    try:
        return open(path, "rb")
    except OSError as err:
        raise PrepareError(f"{name}: cannot be read ({err.strerror})") from None


def _decompressed(raw, compression):
    """The decompressed bytes of the open file `raw` (closed with it)."""
    return READERS[compression](raw, "rb") if compression in READERS else raw


def _damaged(name, compression, err):
    if compression == "none":
        return PrepareError(f"{name}: cannot be read ({getattr(err, 'strerror', None) or err})")
    ended = isinstance(err, EOFError)
    return PrepareError(f"{name}: {'ends early' if ended else 'is damaged'}: not whole {compression} data ({err}); "
                        "nothing was written (download or copy it again)")
