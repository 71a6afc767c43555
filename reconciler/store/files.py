"""The Raft files in a data dir, checked before PySyncObj opens them, and the free-space guard.

PySyncObj 0.3.17 trusts its files: a truncated journal fails with a bare ``struct.error`` (or
reads garbage records), and ``__loadDumpFile`` catches every error and starts with an EMPTY state
that it then serves. ``check_raft_files`` reads both files the way PySyncObj does and raises a
``ValueError`` naming the file and what to do, so a node never starts on a broken file.
"""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

from pysyncobj import pickle as raft_pickle
from pysyncobj.journal import APP_NAME, FIRST_RECORD_OFFSET, LAST_RECORD_OFFSET_OFFSET

# Writes are refused while the data dir has less free space than this: the journal is an mmap,
# and a page that cannot be backed on a full disk kills the process with SIGBUS.
MIN_FREE_BYTES = 32 * 1024 * 1024

_RECOVER = ("stop the node, move {files} out of {dir} and start it again: it re-syncs the state from "
            "its peers (with no peers, restore the data dir from a backup)")


def _recovery(data_dir: Path, *names: str) -> str:
    return _RECOVER.format(files=", ".join(names), dir=data_dir)


def check_journal(path: Path) -> None:
    """Every record of the journal is whole, in index order and unpickles; raises ValueError."""
    names = (path.name, path.name + ".meta", "raft.dump")
    data = path.read_bytes()
    if len(data) < FIRST_RECORD_OFFSET or not data.startswith(APP_NAME):
        raise ValueError(f"{path}: not a Raft journal (header missing or cut short); {_recovery(path.parent, *names)}")
    end = struct.unpack_from("<I", data, LAST_RECORD_OFFSET_OFFSET)[0]
    if end > len(data):
        raise ValueError(f"{path}: truncated Raft journal (records end at byte {end}, the file has "
                         f"{len(data)}); {_recovery(path.parent, *names)}")
    offset, last_index = FIRST_RECORD_OFFSET, None
    while offset < end:
        problem = None
        if offset + 4 > end:
            problem = "a record header is cut short"
        else:
            size = struct.unpack_from("<I", data, offset)[0]
            if size < 16 or offset + size + 8 > end or struct.unpack_from("<I", data, offset + 4 + size)[0] != size:
                problem = "a record's length is inconsistent"
            else:
                index, _term = struct.unpack_from("<QQ", data, offset + 4)
                if last_index is not None and index != last_index + 1:
                    problem = f"record index {index} follows {last_index}"
                else:
                    problem = _command_problem(index, data[offset + 20:offset + 4 + size])
                last_index = index
        if problem:
            raise ValueError(f"{path}: corrupt Raft journal at byte {offset}: {problem}; "
                             f"{_recovery(path.parent, *names)}")
        offset += size + 8


def _command_problem(index: int, command: bytes) -> str | None:
    """A journal command is a type byte (0 regular, 1 no-op, 2 membership, 3 version), then a pickle."""
    if not command or command[0] > 3 or (command[0] == 1) != (len(command) == 1):
        return f"record {index} has no valid command type"
    if command[0] == 1:
        return None
    try:
        raft_pickle.loads(command[1:])
    except Exception as exc:  # noqa: BLE001 — any unpickling failure means corruption
        return f"record {index} does not decode ({type(exc).__name__})"
    return None


def check_dump(path: Path) -> object:
    """The dump decodes as PySyncObj writes it: (data, last entry, entry before, cluster)."""
    names = (path.name, "raft.journal", "raft.journal.meta")
    try:
        with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
            dump = raft_pickle.load(unzipped)
        data, last, before, _cluster = dump
        if not (isinstance(data, list) and len(data) == 2 and len(last) == 3 and len(before) == 3):
            raise ValueError("unexpected layout")
    except Exception as exc:  # noqa: BLE001 — gzip, pickle and layout errors alike
        raise ValueError(f"{path}: corrupt Raft snapshot ({type(exc).__name__}: {exc}); "
                         f"{_recovery(path.parent, *names)}") from None
    return data[1]


def free_bytes(data_dir: Path) -> int:
    return shutil.disk_usage(data_dir).free


def disk_full_reason(data_dir: Path, *, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why writes must be refused now for lack of space in ``data_dir``; None when there is room."""
    try:
        free = free_bytes(data_dir)
    except OSError as exc:
        return f"the data dir {data_dir} cannot be checked for free space: {exc.strerror or exc}"
    if free >= min_free:
        return None
    return (f"the data dir {data_dir} is full ({free / 2**20:.1f} MiB free, {min_free / 2**20:.0f} MiB needed): "
            "writes are refused until space is freed; nothing written so far is lost")


def remove_raft_files(data_dir: Path, names: tuple[str, ...]) -> None:
    for name in names:
        try:
            os.unlink(data_dir / name)
        except FileNotFoundError:
            pass
