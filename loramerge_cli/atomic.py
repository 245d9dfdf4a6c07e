"""The one way loramerge replaces a file: write a temporary sibling, flush it to disk, then rename it over
the target. A kill at any moment leaves the old file or the new one; a full disk or a missing permission is
one line; a Ctrl-C that some library swallowed keeps the old file (loramerge_cli.interrupts). Also the one way
it reads a safetensors file (`read_safetensors`, `safetensors_metadata`), whatever bytes its path is made of."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from loramerge_cli.errors import LoramergeError


LONGEST_NAME_KEPT = 100  # bytes of a name that a hidden sibling's name repeats (a name may have 255 in all)


def sibling_prefix(path: Path) -> str:
    """The start of the names of `path`'s hidden siblings (a temporary file, a staging folder), one per target:
    `.NAME.loramerge-`, a long NAME shortened (and told apart by its hash) so that any name the file system
    allows leaves room for the rest."""
    name = path.name
    if len(os.fsencode(name)) > LONGEST_NAME_KEPT:
        import hashlib

        digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:12]
        kept = name
        while len(os.fsencode(kept)) > LONGEST_NAME_KEPT - len(digest) - 1:
            kept = kept[:-1]
        name = f"{kept}~{digest}"
    return f".{name}.loramerge-"


def temporary_sibling(path: Path) -> Path:
    """A new empty file beside `path` where its next version is written first: `.NAME.loramerge-PID.RANDOM.tmp`
    (outputs.clean_debris removes those of dead processes), created exclusively under a name no one can guess,
    so a link planted beside `path` is never written through; with the user's umask, like `path`."""
    import tempfile

    handle, name = tempfile.mkstemp(prefix=f"{sibling_prefix(path)}{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(handle, 0o666 & ~user_umask())  # mkstemp's file is private (0600)
    finally:
        os.close(handle)
    return Path(name)


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is synced and atomically replaces `path`, on
    failure it is removed."""
    from loramerge_cli import interrupts

    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_sibling(path)
        yield temporary
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        interrupts.check()  # a Ctrl-C some library swallowed: keep the previous file
        _commit(temporary, path)
    except OSError as error:
        _remove(temporary)
        raise LoramergeError(f"{path}: cannot write it ({error.strerror or error})") from None
    except BaseException:
        _remove(temporary)
        raise


def _remove(temporary: Path | None) -> None:
    if temporary is not None:
        temporary.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8; a path decoded from bytes in an ASCII locale is written back as its
    bytes), atomically."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data`, atomically."""
    with replacing(path) as temporary:
        temporary.write_bytes(data)


def _commit(temporary: Path, path: Path) -> None:
    os.replace(temporary, path)


def write_new(path: str | Path, text: str | bytes) -> None:
    """Create `path` with `text` (or bytes), atomically, only where nothing is: FileExistsError if something is
    there, even if it appeared a moment ago (the finished file is linked into place, never renamed over it)."""
    from loramerge_cli import interrupts

    path = Path(path)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = temporary_sibling(path)
        temporary.write_bytes(text if isinstance(text, bytes) else text.encode())
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        interrupts.check()
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:  # a file system without hard links: check, then rename (a far smaller window)
            if os.path.lexists(path):
                raise FileExistsError(path) from None
            _commit(temporary, path)
    except FileExistsError:
        raise
    except OSError as error:
        raise LoramergeError(f"{path}: cannot write it ({error.strerror or error})") from None
    finally:
        _remove(temporary)


def save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as OSError, as any other write's: the
    callers report those in one line. The file gets the usual permissions (0666 less the umask)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as error:  # "Error while serializing: I/O error: No space left on device (os error 28)"
        raise OSError(str(error).split("I/O error: ")[-1].split(" (os error")[0]) from None
    os.chmod(path, 0o666 & ~user_umask())  # safetensors creates it private (0600), unlike any other file written


def user_umask() -> int:
    """The process's umask (read by setting it, then set back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


class TooLarge(ValueError):
    """A file expected to be small is larger than its limit."""


def read_small_file(source, limit: int) -> bytes:
    """The bytes of a file expected to be small (a path, or an open binary stream), at most `limit` of them: past
    it, TooLarge (/dev/zero or a log given by mistake is not read whole, until memory runs out). Raises OSError."""
    if hasattr(source, "read"):
        raw = source.read(limit + 1)
    else:
        with open(source, "rb") as handle:
            raw = handle.read(limit + 1)
    if len(raw) > limit:
        raise TooLarge(f"over {limit // (1 << 20)} MiB")
    return raw


def read_safetensors(path: str | Path) -> dict:
    """The tensors of a safetensors file. safetensors opens UTF-8 paths only: a path of other bytes (as Linux
    allows) is read whole and parsed from memory. Raises what safetensors raises, or OSError."""
    from safetensors.torch import load, load_file

    name = os.fspath(path)
    if _utf8(name):
        return load_file(name)
    with open(name, "rb") as handle:
        return load(handle.read())


def safetensors_metadata(path: str | Path) -> dict:
    """The metadata (`__metadata__`) of a safetensors file, whatever bytes its path is made of; {} if it has
    none. Raises what safetensors raises, OSError, or ValueError."""
    import json

    from safetensors import safe_open

    name = os.fspath(path)
    if _utf8(name):
        with safe_open(name, framework="pt") as handle:
            return handle.metadata() or {}
    with open(name, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: the name's bytes are not UTF-8
        return False
    return True
