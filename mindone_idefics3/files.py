"""Files on disk: reading a checkpoint's JSON files, and writing files and directories atomically.

Atomic means that a reader (or a run started after a crash or a power cut) finds the old file or the new one,
never a part of it: the new content is written to a temporary name beside the target (same directory, so the
same file system), flushed to disk, renamed over the target, and the directory is flushed so the rename itself
is on disk. Temporary names start with a dot (hidden) and end with the target's suffix, so libraries that pick
a format from the file name (matplotlib's savefig) still do.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Union

from .errors import Idefics3Error

PathLike = Union[str, Path]


def read_json(path: PathLike, missing_ok: bool = False) -> dict:
    """The JSON object in `path`, or one Idefics3Error saying what is wrong with the file; {} for a missing file
    when `missing_ok` (optional files such as generation_config.json)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # not UTF-8 or not JSON, a number too long, nesting too deep
        raise Idefics3Error(f"{path} is not valid JSON ({e}); download or write it again") from None
    except OSError as e:
        if missing_ok and isinstance(e, FileNotFoundError):
            return {}
        raise Idefics3Error(f"{path} cannot be read ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise Idefics3Error(f"{path} must hold a JSON object, not {type(data).__name__}")
    return data


def fsync(path: PathLike) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write the new file to (itself, or through a library that
    wants a path: safetensors' save_file, matplotlib's savefig). When the block ends, that file replaces `path`
    atomically; if the block raises, it is removed and `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync(path.parent)


def write_text_atomically(path: PathLike, text: str) -> None:
    """Replace `path` with `text` (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomically(path: PathLike, data) -> None:
    """Replace `path` with `data` as indented JSON, atomically."""
    write_text_atomically(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def atomic_directory(path: PathLike) -> Iterator[Path]:
    """A fresh temporary directory beside `path` for the block to fill. When the block ends, it replaces `path`
    (`replace_directory`); if the block raises, it is removed and `path` stays as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    remove(tmp)  # left by a run that was killed
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def replace_directory(new: Path, dst: Path) -> None:
    """`new` (a complete directory, its files at its top level) becomes `dst`, flushed to disk first. An existing
    `dst` stays whole until the new one is in its place, then is deleted: one atomic exchange where the system has
    it, else two renames that put the old `dst` back if the second fails."""
    for entry in [*new.iterdir(), new]:
        fsync(entry)
    if not (dst.exists() or dst.is_symlink()):
        os.rename(new, dst)
    elif _exchange(new, dst):
        remove(new)  # now the old dst
    else:
        old = dst.with_name(new.name + ".old")
        remove(old)  # left by a replacement that was killed after its second rename
        os.rename(dst, old)
        try:
            os.rename(new, dst)
        except BaseException:
            os.rename(old, dst)
            raise
        remove(old)
    fsync(dst.parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove(path: Path) -> None:
    """Delete a file, a symlink or a directory tree; nothing if `path` does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
