"""Reading the files a user points lmflow at (datasets, --config, --messages, template files), safely.

Only regular files are read (a symlink to one is fine): a named pipe would block the read forever and a
device such as ``/dev/zero`` never ends. The file is checked with ``stat`` before it is opened, opened with
``O_NONBLOCK`` (so a pipe swapped in after the check cannot block the open) and checked again with ``fstat``.
Reads stop at a size limit, and ``.gz`` files are decompressed as a stream with a guard against gzip bombs.
Every refusal is an :class:`~lmflow_core.errors.LmflowError` (of the class the caller names) whose one line
names the file and the fix.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import LmflowError

#: Settings, conversations and templates are small; anything bigger is not what the user meant to pass.
SMALL_FILE_LIMIT = 64 * 2**20
#: One dataset file (after decompression). Datasets are read as a stream, so this only stops a file that never
#: ends (one still being written to, say); split larger data into several files of one directory.
DATASET_FILE_LIMIT = 1024 * 2**30
#: A ``.gz`` file may decompress to this many times its size, or to ``GZIP_FLOOR`` bytes, whichever is more.
#: Text and JSON compress 3 to 20 times; a gzip bomb compresses about 1000 times.
GZIP_RATIO = 200
GZIP_FLOOR = 2**30
_CHUNK = 2**20

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, in words (``"a named pipe (FIFO)"``, ``"a regular file"``...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def open_input_file(
    path: str | os.PathLike, what: str = "file", fix: str = "check the path", error: type = LmflowError
) -> BinaryIO:
    """Open the regular file at ``path`` for binary reading, refusing anything else.

    Args:
        what: how messages name the file (``"dataset"``, ``"--config file"``...).
        fix: the advice when the path is missing or is not a regular file.
        error: the :class:`LmflowError` subclass to raise.
    """
    path = Path(path).expanduser()
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        broken = " (a symlink whose target is missing)" if path.is_symlink() else ""
        raise error(f"{what} {path} does not exist{broken}", fix) from None
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror})", fix) from None
    _check_regular(path, mode, what, fix, error)
    # O_NONBLOCK: were a pipe put in the file's place after the stat, opening it must not wait for a writer.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise error(f"{what} {path} cannot be read ({exc.strerror})", fix) from None
    try:
        _check_regular(path, os.fstat(fd).st_mode, what, fix, error)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_input_file(
    path: str | os.PathLike,
    what: str = "file",
    fix: str = "check the path",
    error: type = LmflowError,
    limit: int | None = None,
    decompress: bool = False,
) -> bytes:
    """The bytes of the regular file at ``path`` (see :func:`open_input_file`), at most ``limit`` of them
    (default ``SMALL_FILE_LIMIT``).

    With ``decompress``, a file whose name ends in ``.gz`` (any case) is gunzipped as it is read; it may
    decompress to at most ``GZIP_RATIO`` times its size (or ``GZIP_FLOOR`` bytes), which stops gzip bombs.
    """
    with open_input_stream(path, what, fix, error, limit, decompress) as stream:
        chunks = []
        while chunk := stream.read(_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)


class _Bounded:
    """A binary stream that calls ``too_large()`` (which raises) once more than ``limit`` bytes were read from
    it, and ``broken(exc)`` (which raises) where reading fails; ``position`` counts the bytes read so far."""

    def __init__(
        self,
        stream: BinaryIO,
        limit: int,
        too_large: Callable[[], None],
        broken: Callable[[BaseException], None] | None = None,
    ):
        self.stream, self.limit, self.too_large, self.broken, self.position = (
            stream,
            limit,
            too_large,
            broken,
            0,
        )

    def _count(self, read: Callable[[int], bytes], size: int) -> bytes:
        try:
            data = read(size)
        except (OSError, EOFError, zlib.error) as exc:
            if self.broken is None:
                raise
            self.broken(exc)
            raise
        self.position += len(data)
        if self.position > self.limit:
            self.too_large()
        return data

    def read(self, size: int = -1) -> bytes:
        return self._count(self.stream.read, size if size >= 0 else _CHUNK)

    def readline(self, size: int = -1) -> bytes:
        return self._count(self.stream.readline, size)


@contextlib.contextmanager
def open_input_stream(
    path: str | os.PathLike,
    what: str = "file",
    fix: str = "check the path",
    error: type = LmflowError,
    limit: int | None = None,
    decompress: bool = False,
) -> Iterator[_Bounded]:
    """The regular file at ``path`` as a binary stream (``read``, ``readline``, ``position``), checked as
    :func:`read_input_file` checks it, for reading a large file without holding it: past ``limit`` bytes (or
    a ``.gz`` file's gzip-bomb bound, with ``decompress``) a read raises ``error``; so does a broken gzip file.
    """
    path = Path(path).expanduser()
    limit = SMALL_FILE_LIMIT if limit is None else limit
    with open_input_file(path, what, fix, error) as handle:
        size = os.fstat(handle.fileno()).st_size
        if not (decompress and path.name.lower().endswith(".gz")):
            if size > limit:
                raise error(
                    f"{what} {path} is {format_bytes(size)}, more than the {format_bytes(limit)} lmflow reads "
                    "from one file",
                    _too_large_fix(what),
                )
            yield _Bounded(handle, limit, lambda: _too_large(path, what, limit, error))
            return
        bound = min(limit, max(GZIP_FLOOR, GZIP_RATIO * size))

        def broken(exc: BaseException) -> None:
            raise error(
                f"{what} {path} is not a valid gzip file ({exc})",
                "recompress it with gzip, or remove the .gz",
            ) from None

        with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
            yield _Bounded(
                io.BufferedReader(stream, _CHUNK),
                bound,
                lambda: _gzip_too_large(path, what, size, bound, limit, error),
                broken,
            )


def read_input_text(
    path: str | os.PathLike,
    what: str = "file",
    fix: str = "check the path",
    error: type = LmflowError,
    limit: int | None = None,
    decompress: bool = False,
) -> str:
    """:func:`read_input_file` decoded as UTF-8; text that is not UTF-8 is an error naming the byte."""
    data = read_input_file(path, what, fix, error, limit, decompress)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(
            f"{what} {Path(path).expanduser()} is not UTF-8 text (byte {exc.start})",
            "re-encode the file as UTF-8",
        ) from None


def _check_regular(path: Path, mode: int, what: str, fix: str, error: type) -> None:
    if not stat.S_ISREG(mode):
        target = f" (a symlink to {os.path.realpath(path)})" if path.is_symlink() else ""
        raise error(f"{what} {path} is {file_kind(mode)}{target}, not a regular file", fix)


def _too_large_fix(what: str) -> str:
    if "dataset" in what:
        return "split it into several files in one directory"
    return "pass the file you meant; this one is far larger than such a file can be"


def _too_large(path: Path, what: str, limit: int, error: type) -> None:
    raise error(
        f"{what} {path} holds more than the {format_bytes(limit)} lmflow reads from one file",
        _too_large_fix(what),
    )


def _gzip_too_large(path: Path, what: str, size: int, bound: int, limit: int, error: type) -> None:
    if bound >= limit:
        _too_large(path, what, limit, error)
    raise error(
        f"{what} {path} decompresses to more than {format_bytes(bound)} ({GZIP_RATIO} times its "
        f"{format_bytes(size)}, or {format_bytes(GZIP_FLOOR)}), so it is refused as a possible gzip bomb",
        "if the data is real, decompress it yourself (gunzip) and pass the uncompressed file",
    )


# ---- images -------------------------------------------------------------------------------------------------

#: The largest image file (or decoded ``data:`` URL) lmflow reads: a large camera photo is under 20 MB.
IMAGE_FILE_LIMIT = 20 * 2**20
#: The most pixels one image may have once decoded. A small file can decode to a huge picture (a decompression
#: bomb: a few KB of PNG can claim 100000 x 100000 pixels), so the size in the header is checked before the
#: pixels are decoded. 50 megapixels is more than any camera photo; vision models resize far below this.
IMAGE_PIXEL_LIMIT = 50_000_000


def open_image_bytes(data: bytes, name: str, error: type = LmflowError) -> object:
    """The ``PIL.Image`` that ``data`` holds, fully decoded, refusing what is not an image PIL can read and
    pictures of more than :data:`IMAGE_PIXEL_LIMIT` pixels (checked from the header, before decoding).

    Args:
        name: how messages name the image (``"image photo.png"``, ``"messages.0.content.1"``...).
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if len(data) > IMAGE_FILE_LIMIT:
        raise error(
            f"{name} is {format_bytes(len(data))}, more than the {format_bytes(IMAGE_FILE_LIMIT)} lmflow reads "
            "from one image",
            "send a smaller image (resize it or save it as JPEG)",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > IMAGE_PIXEL_LIMIT:
                raise error(
                    f"{name} is {width} x {height} pixels, more than the {IMAGE_PIXEL_LIMIT // 1_000_000} "
                    "megapixels lmflow decodes",
                    "resize the image (vision models read far fewer pixels)",
                )
            image.load()
    except LmflowError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        what = "a picture too large to decode" if "bomb" in type(exc).__name__.lower() else "not an image"
        raise error(
            f"{name} is {what} that PIL can read", "send a PNG, JPEG, GIF, WebP or BMP image"
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt image data
        raise error(
            f"{name} is a broken image ({exc})", "send the image again, or save it anew as PNG or JPEG"
        ) from None
    return image


def read_image_file(path: str | os.PathLike, error: type = LmflowError) -> object:
    """The image in the regular file at ``path``, decoded (see :func:`open_image_bytes`); every refusal is
    one line naming the file and the fix."""
    data = read_input_file(path, "image", "pass the path of an image file", error, limit=IMAGE_FILE_LIMIT)
    return open_image_bytes(data, f"image {Path(path).expanduser()}", error)


def image_from_data_url(url: str, name: str, error: type = LmflowError) -> object:
    """The image of a base64 ``data:`` URL (``data:image/png;base64,...``), decoded and checked as
    :func:`open_image_bytes` checks it; the base64 is measured before it is decoded."""
    import base64
    import binascii

    head, comma, payload = url.partition(",")
    if not comma or not head[:5].lower() == "data:":
        raise error(f"{name} is not a data: URL", 'send "data:image/png;base64,<base64 of the file>"')
    if not head.lower().endswith(";base64"):
        raise error(
            f"{name} is a data: URL without base64 ({head[:60]})",
            'send "data:image/png;base64,<base64 of the file>"',
        )
    media = head[5:-7].split(";")[0].strip().lower()
    if media and not media.startswith("image/"):
        raise error(f"{name} is a data: URL of {media[:60]}, not an image", "send an image (image/png...)")
    compact = "".join(payload.split())  # some encoders wrap lines
    if len(compact) // 4 * 3 > IMAGE_FILE_LIMIT + 3:
        raise error(
            f"{name} is about {format_bytes(len(compact) // 4 * 3)}, more than the "
            f"{format_bytes(IMAGE_FILE_LIMIT)} lmflow reads from one image",
            "send a smaller image (resize it or save it as JPEG)",
        )
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise error(
            f"{name} holds broken base64 ({exc})", "encode the image file with standard base64 (RFC 4648)"
        ) from None
    return open_image_bytes(data, name, error)
