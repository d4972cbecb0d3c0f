"""A JSON-lines log of the publisher calls Tiled did not take, and its replay.

When Tiled is unreachable the publisher keeps going and writes each call of the affected run to
``<backup_dir>/<run_uid>.jsonl`` (one JSON object a line: ``time``, ``call``, ``run_uid``,
``args``, ``arrays``, ``error``). Arrays go beside it as ``<backup_dir>/<run_uid>/<name>.npy``,
overwritten in place: the Approximant and the volumes are full states, so the newest copy is all
a replay needs. :func:`replay_backup` feeds the log to a publisher once Tiled is back (the
:class:`~apt_stream.publish.TiledPublisher` does so itself when it notices Tiled answering
again); a file replayed that way moves to ``<backup_dir>/replayed/<time>/`` with its arrays.
Replaying is idempotent: a file replayed twice leaves the scan as one replay does.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream.errors import InputError
from apt_stream.publish._metadata import json_safe

log = logging.getLogger(__name__)

#: Publisher methods a backup line may name, with the argument names replay passes on.
REPLAYABLE: tuple[str, ...] = (
    "run_started", "angle_finished", "update_approximant", "reconstruction_ready",
    "metrics_ready", "update_status", "run_stopped", "convergence_ready",
)


#: Sub-folder of a backup folder that replayed files move to (one folder per replay).
REPLAYED_DIR = "replayed"


def _array_file_name(name: str) -> str:
    # Volume names may be paths ("baselines/fbp"); keep one flat folder per run.
    return name.replace("/", "__") + ".npy"


class BackupLog:
    """Append-only per-run call logs under ``directory`` (created on first use)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        #: Calls written so far (all runs).
        self.n_records = 0

    def path_for(self, run_uid: str) -> Path:
        """The JSON-lines file of one run."""
        return self.directory / f"{run_uid}.jsonl"

    def files(self) -> list[Path]:
        """The backup files waiting in the folder (not the replayed ones), sorted by name."""
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.jsonl") if p.is_file())

    def archive(self, path: str | os.PathLike) -> Path:
        """Move a replayed file and its arrays to ``replayed/<UTC time>/``; returns its new path.

        Relative array paths in the file still resolve there, so it can be read (and replayed)
        again.
        """
        path = Path(path)
        stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target_dir = self.directory / REPLAYED_DIR / stamp
        target_dir.mkdir(parents=True, exist_ok=True)
        arrays = path.parent / path.stem
        if arrays.is_dir():
            shutil.move(str(arrays), str(target_dir / arrays.name))
        target = target_dir / path.name
        os.replace(path, target)
        return target

    def record(
        self,
        run_uid: str,
        call: str,
        args: Mapping[str, Any],
        *,
        arrays: Mapping[str, np.ndarray] | None = None,
        error: str | None = None,
    ) -> Path:
        """Append one call (arrays saved beside the log); returns the log's path."""
        if call not in REPLAYABLE:
            raise InputError(f"cannot back up unknown call {call!r}; expected one of {REPLAYABLE}")
        run_dir = self.directory / run_uid
        files: dict[str, str] = {}
        for name, array in (arrays or {}).items():
            run_dir.mkdir(parents=True, exist_ok=True)
            target = run_dir / _array_file_name(name)
            tmp = target.with_suffix(".tmp.npy")
            np.save(tmp, np.asarray(array))
            # A reader never sees half an array: the rename is atomic.
            os.replace(tmp, target)
            files[name] = str(target.relative_to(self.directory))
        line = {
            "time": _dt.datetime.now(_dt.UTC).isoformat(),
            "call": call,
            "run_uid": run_uid,
            "args": json_safe(dict(args)),
            "arrays": files,
            "error": error,
        }
        path = self.path_for(run_uid)
        self.directory.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")
        self.n_records += 1
        return path


def read_backup(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of one backup file, arrays loaded (``record["arrays"][name]`` is an ndarray)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"backup file {path} does not exist")
    records = []
    # The Approximant and volumes are overwritten in place: many records name one file.
    loaded: dict[str, np.ndarray] = {}
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{n} is not JSON: {exc}") from None
        if rec.get("call") not in REPLAYABLE or not isinstance(rec.get("args"), dict):
            raise InputError(f"{path}:{n} is not a publisher call record")
        arrays = {}
        for name, rel in (rec.get("arrays") or {}).items():
            if rel not in loaded:
                loaded[rel] = np.load(path.parent / rel, allow_pickle=False)
            arrays[name] = loaded[rel]
        rec["arrays"] = arrays
        records.append(rec)
    return records


def replay_backup(path: str | os.PathLike, publisher: Any) -> int:
    """Send a backup file's calls, in order, to ``publisher``; returns the number sent.

    A directory replays every ``*.jsonl`` in it (sorted by name; not ``replayed/``). Replaying
    is idempotent with a :class:`~apt_stream.publish.TiledPublisher`: it reopens an existing
    scan container, keeps one row per angle (angles it has already are skipped), counts
    ``angles_used`` over all of them and overwrites arrays and metadata, so replaying a file
    twice, or one whose first calls reached Tiled before the outage, duplicates nothing.
    """
    path = Path(path)
    files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    sent = 0
    for file in files:
        for rec in read_backup(file):
            call, args, arrays, uid = rec["call"], rec["args"], rec["arrays"], rec["run_uid"]
            method = getattr(publisher, call)
            if call == "run_started":
                method(args["header"])
            elif call == "angle_finished":
                method(uid, args["summary"], arrays["approximant"])
            elif call == "update_approximant":
                method(uid, arrays["approximant"])
            elif call == "reconstruction_ready":
                method(uid, arrays, final=bool(args["final"]), metadata=args.get("metadata"))
            elif call == "metrics_ready":
                method(uid, args["metrics"])
            elif call == "convergence_ready":
                method(uid, args["row"], args.get("advice"))
            elif call == "update_status":
                method(uid, args["status"], **(args.get("metadata") or {}))
            elif args.get("metadata"):
                # Extra metadata of the stop (frames_missing, ..., the run's own timings).
                method(uid, args["status"], metadata=args["metadata"])
            else:
                method(uid, args["status"])
            sent += 1
        log.info("replayed %s", file)
    return sent
