"""Reading detector and probe files that documents point at, without ever blocking the listener.

A file in a data root is written by someone else and may be anything: a FIFO (opening it blocks
until a writer appears), a device, a file truncated by a full disk, a half-copied file, a group
where a dataset should be. Two measured hazards shape this module:

* h5py's SWMR open of a file truncated to 1 kB does not fail: it retries for minutes, holding
  h5py's global lock, so every other h5py call in the process waits too. A timeout on a thread
  cannot help (the lock is process-wide).
* A reader must tolerate a file that is still being written (SWMR), so "not readable yet" and
  "broken for good" have to be told apart.

So each file is first *checked* here with plain ``os`` calls that cannot block (type, size, HDF5
signature, the superblock's end-of-file address against the size on disk), and all HDF5 work runs
in a **child process** (:class:`FrameReader`) with a per-call time limit: a call that overruns
gets the child killed and restarted, and the file is refused. The child is our own process, so
the arrays it returns travel by a multiprocessing connection over a socket pair (pickle between
trusted ends, never data from the network). The child is a fresh interpreter started with
``python -c`` that imports :func:`_serve`, not a multiprocessing spawn, so a user's script
without an ``if __name__ == "__main__"`` guard is never re-imported.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np

from apt_stream.child_process import die_with_parent_preexec
from apt_stream.errors import DocumentError

log = logging.getLogger(__name__)

_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Where HDF5 looks for its signature: 0, then 512, 1024, 2048, ... (a user block may precede it).
_SIGNATURE_OFFSETS = (0, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

Verdict = Literal["ok", "wait", "refuse"]


class FileRefused(DocumentError):
    """A detector or probe file that will never be readable (wrong type, not HDF5, bad layout)."""


class FileNotReady(DocumentError):
    """A file that is not readable *yet* (missing, still short, dataset not created)."""


@dataclass(frozen=True)
class FileCheck:
    verdict: Verdict
    reason: str = ""


def _superblock_eof(head: bytes) -> int | None:
    """The end-of-file address a superblock records, or None if it cannot be parsed."""
    version = head[8] if len(head) > 8 else None
    try:
        if version in (0, 1):
            size_offsets = head[13]
            pos = 24 + (4 if version == 1 else 0)  # group K values, flags, (v1: indexed K)
        elif version in (2, 3):
            size_offsets = head[9]
            pos = 12
        else:
            return None
        if size_offsets not in (2, 4, 8):
            return None
        fmt = {2: "<H", 4: "<I", 8: "<Q"}[size_offsets]
        # base address, (free-space / extension address), end-of-file address
        base = struct.unpack_from(fmt, head, pos)[0]
        eof = struct.unpack_from(fmt, head, pos + 2 * size_offsets)[0]
    except (IndexError, struct.error):
        return None
    if eof == (1 << (8 * size_offsets)) - 1:  # "undefined address"
        return None
    return base + eof


def check_file(path: str | os.PathLike) -> FileCheck:
    """Decide, with calls that cannot block, whether a file may be handed to HDF5.

    ``"wait"``: not there or not complete yet (retry); ``"refuse"``: never readable as HDF5.
    """
    try:
        st = os.stat(path)  # never opens the file: safe on a FIFO or a device
    except FileNotFoundError:
        return FileCheck("wait", "the file does not exist (yet)")
    except OSError as exc:
        return FileCheck("refuse", f"cannot stat the file: {exc.strerror or exc}")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a directory" if stat.S_ISDIR(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        return FileCheck("refuse", f"it is {kind}, not a regular file")
    if st.st_size < 64:
        return FileCheck("wait", f"the file holds only {st.st_size} bytes")
    try:
        # O_NONBLOCK: harmless on a regular file, and a file swapped for a FIFO since the stat
        # still cannot block us.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        return FileCheck("refuse", f"cannot open the file: {exc.strerror or exc}")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return FileCheck("refuse", "it is not a regular file")
        for offset in _SIGNATURE_OFFSETS:
            if offset + 64 > st.st_size:
                break
            head = os.pread(fd, 96, offset)
            if head.startswith(_SIGNATURE):
                break
        else:
            return FileCheck("refuse", "it is not an HDF5 file (no HDF5 signature)")
        if not head.startswith(_SIGNATURE):
            return FileCheck("refuse", "it is not an HDF5 file (no HDF5 signature)")
    finally:
        os.close(fd)
    eof = _superblock_eof(head)
    if eof is not None and st.st_size < eof:
        # A SWMR writer flushes data before the superblock that counts it, so on a healthy file
        # the size on disk is never below the recorded end of file.
        return FileCheck("wait", f"the file is truncated: {st.st_size} bytes on disk, its "
                                 f"superblock says {eof}")
    return FileCheck("ok")


#: What the child runs: a plain import, so the parent's __main__ is never re-imported.
_CHILD_MAIN = (
    "import sys; from multiprocessing.connection import Connection; "
    "from apt_stream.stream.detector_files import _serve; _serve(Connection(int(sys.argv[1])))"
)


# -- the child process ---------------------------------------------------------------------------
def _serve(conn) -> None:  # pragma: no cover - runs in the child process
    import h5py

    files: dict[tuple[str, bool], Any] = {}
    # One Dataset object per dataset, reused: refreshing a second open handle of a dataset while
    # another is alive corrupts HDF5's chunk index ("can't insert duplicate key", wrong rows).
    datasets: dict[tuple[str, bool, str], Any] = {}

    def dataset(path: str, name: str, swmr: bool):
        ds = datasets.get((path, swmr, name))
        if ds is None:
            fh = files.get((path, swmr))
            if fh is None:
                fh = files[(path, swmr)] = h5py.File(path, "r", swmr=swmr)
            if name not in fh:
                raise KeyError(f"no dataset {name!r}")
            ds = fh[name]
            if not isinstance(ds, h5py.Dataset):
                raise TypeError(f"{name!r} is a {type(ds).__name__}, not a dataset")
            datasets[(path, swmr, name)] = ds
        if swmr:
            ds.refresh()
        return ds

    def forget(path: str) -> None:
        for key in [k for k in datasets if k[0] == path]:
            del datasets[key]
        for key in [k for k in files if k[0] == path]:
            try:
                files.pop(key).close()
            except Exception:
                pass

    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        op = request[0]
        try:
            if op == "rows":
                _, path, name, rows, shape = request
                ds = dataset(path, name, True)
                if ds.ndim != 3 or tuple(ds.shape[1:]) != tuple(shape):
                    raise TypeError(f"{name!r} has shape {ds.shape}; frames of {tuple(shape)} "
                                    "stacked along axis 0 are expected")
                if ds.dtype.kind not in "fiu":
                    raise TypeError(f"{name!r} holds {ds.dtype}, not numbers")
                n = int(ds.shape[0])
                want = [r for r in rows if r < n]
                block = np.asarray(ds[sorted(set(want))], dtype=np.float32) if want else None
                conn.send(("ok", (n, sorted(set(want)), block)))
            elif op == "array":
                _, path, name = request
                ds = dataset(path, name, False)
                conn.send(("ok", np.asarray(ds[()])))
            elif op == "close":
                forget(request[1])
                conn.send(("ok", None))
            else:
                conn.send(("err", "refuse", f"unknown request {op!r}"))
        except (KeyError, FileNotFoundError) as exc:
            conn.send(("err", "wait", str(exc.args[0] if exc.args else exc)))
        except OSError as exc:
            # HDF5 reports a file still being created and a damaged one alike; the caller's
            # deadline turns a persistent OSError into a refusal.
            forget(request[1])
            conn.send(("err", "wait", f"HDF5 cannot read it: {exc}"))
        except Exception as exc:
            conn.send(("err", "refuse", f"{type(exc).__name__}: {exc}"))


class FrameReader:
    """HDF5 reads in a child process, each bounded by ``timeout_s``.

    Thread-safe (one request at a time). ``read_rows`` and ``read_array`` raise
    :class:`FileNotReady` (retry later) or :class:`FileRefused` (give up on this file).
    """

    def __init__(self, *, timeout_s: float = 10.0) -> None:
        if not timeout_s > 0:
            raise DocumentError(f"timeout_s must be > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._lock = threading.Lock()
        self._proc = None
        self._conn = None
        self.restarts = 0
        self.timeouts = 0

    def _child(self) -> Connection:
        if self._proc is None or self._proc.poll() is not None:
            if self._proc is not None:
                self.restarts += 1
            ours, theirs = socket.socketpair()
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD_MAIN, str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, close_fds=True,
                # Its own session: a terminal's Ctrl-C is for the listener, which then stops
                # the reader itself. It dies with us (kill -9 included), even mid-read.
                start_new_session=True, preexec_fn=die_with_parent_preexec(),
            )
            theirs.close()
            self._conn = Connection(ours.detach())
            self._warm = False
        return self._conn

    def _kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait(5)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def _request(self, request: tuple, path: str) -> Any:
        check = check_file(path)
        if check.verdict == "refuse":
            raise FileRefused(f"{path}: {check.reason}")
        if check.verdict == "wait":
            raise FileNotReady(f"{path}: {check.reason}")
        with self._lock:
            conn = self._child()
            try:
                conn.send(request)
                # The first call also waits for the child to import h5py (about a second).
                limit = self.timeout_s + (0.0 if self._warm else 20.0)
                if not conn.poll(limit):
                    self.timeouts += 1
                    self._kill()
                    raise FileRefused(f"{path}: reading it took longer than {self.timeout_s:g} s "
                                      "(HDF5 hung on it); the reader was restarted")
                reply = conn.recv()
            except (EOFError, OSError, BrokenPipeError) as exc:
                self._kill()
                raise FileRefused(f"{path}: the reader process died on it ({exc!r})") from None
            self._warm = True
        if reply[0] == "ok":
            return reply[1]
        _, kind, message = reply
        raise (FileNotReady if kind == "wait" else FileRefused)(f"{path}: {message}")

    _warm = False

    def read_rows(self, path: str, dataset: str, rows: list[int], frame_shape: tuple[int, int]):
        """``(n_rows_now, rows_read, block)`` of a frames dataset (block None if none ready)."""
        return self._request(("rows", str(path), dataset, list(rows), tuple(frame_shape)), path)

    def read_array(self, path: str, dataset: str) -> np.ndarray:
        """A whole (small) dataset, e.g. the probe modes."""
        return self._request(("array", str(path), dataset), path)

    def release(self, path: str) -> None:
        """Close the child's handle on ``path`` (a finished run's file)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        try:
            self._request(("close", str(path)), path)
        except DocumentError:
            pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except OSError:
                    pass
            if self._proc is not None:
                try:
                    self._proc.wait(2)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(2)
            self._proc = self._conn = None

