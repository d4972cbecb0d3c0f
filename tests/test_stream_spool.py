"""Spool files, run journals and the late-joiner / restart recovery of the document pipeline."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from event_model import sanitize_doc

from apt_stream.errors import DocumentError
from apt_stream.plugins.bluesky import (
    SimPtychoDetector,
    make_run_engine,
    make_stages,
    ptycho_tomo_plan,
    synthetic_scan,
)
from apt_stream.stream import (
    DocumentPipeline,
    FileDocumentSource,
    FrameBatch,
    RunAssembler,
    RunHeader,
    RunRecovery,
    RunSpool,
    RunStopped,
    replay_spool,
)
from apt_stream.stream.schema import JOURNAL_FILE, parse_start_metadata
from apt_stream.stream.spool import JsonlDocumentWriter, encode_line, spool_path

SCAN = synthetic_scan(n_angles=3, frames_per_angle=3, seed=11)


@pytest.fixture(scope="module")
def RE():
    return make_run_engine()


@pytest.fixture
def run(RE, tmp_path):
    """A finished run under tmp_path/data: (docs, journal path)."""
    root = tmp_path / "data"
    docs = []
    token = RE.subscribe(lambda name, doc: docs.append((name, sanitize_doc(doc))))
    try:
        rot, stage_x, stage_y = make_stages()
        RE(ptycho_tomo_plan(SimPtychoDetector(root=root), rot, stage_x, stage_y, scan_source=SCAN))
    finally:
        RE.unsubscribe(token)
    run_dir = parse_start_metadata(docs[0][1]).run_dir
    return docs, root, f"{run_dir}/{JOURNAL_FILE}"


def listener(root, spool_dir, **kwargs):
    out = []
    assembler = RunAssembler(out.append, data_roots=[root])
    spool = RunSpool(spool_dir)
    recovery = RunRecovery(data_roots=[root], spool_dir=spool_dir)
    pipeline = DocumentPipeline([spool, assembler], recovery=recovery, strict=True,
                                retry_interval_s=0.0, **kwargs)
    return pipeline, spool, out


def check_complete_run(out):
    assert isinstance(out[0], RunHeader) and isinstance(out[-1], RunStopped)
    assert sum(isinstance(m, RunHeader) for m in out) == 1
    frames = {}
    for m in out:
        if isinstance(m, FrameBatch):
            frames.setdefault(m.angle_id, []).append(m.frames)
    for n in range(SCAN.n_angles):
        np.testing.assert_array_equal(np.concatenate(frames[n]), SCAN.frames_of(n)[0])
    assert out[-1].n_frames == SCAN.n_frames


def first_index(docs, name, nth=0):
    return [i for i, (n, _) in enumerate(docs) if n == name][nth]


def test_spool_round_trip_and_no_duplicates(run, tmp_path):
    docs, _, _ = run
    spool = RunSpool(tmp_path / "spool")
    for name, doc in docs[:10]:
        spool(name, doc)
    spool.close()
    # A restarted listener replays what it has, then continues: no document is written twice.
    spool = RunSpool(tmp_path / "spool")
    for name, doc in docs:
        spool(name, doc)
    path = spool.path_for(docs[0][1]["uid"])
    assert list(replay_spool(path)) == [(n, d) for n, d in docs]
    assert list(FileDocumentSource(path)) == list(replay_spool(path))


def test_torn_and_bad_lines_are_skipped(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    writer = JsonlDocumentWriter(path)
    writer("start", {"uid": "a", "time": 1.0})
    writer.close()
    with open(path, "a") as fh:
        fh.write("not json\n")
        fh.write('{"name": "stop", "doc": {"uid": "b", "time": 2.0, "run_start": "a"')  # torn
    with caplog.at_level(logging.WARNING):
        assert [n for n, _ in replay_spool(path)] == ["start"]
    assert "line 2" in caplog.text and "line 3" not in caplog.text
    with pytest.raises(DocumentError, match="not safe"):
        spool_path(tmp_path, "../escape")
    with pytest.raises(DocumentError, match="does not exist"):
        list(replay_spool(tmp_path / "missing.jsonl"))


def test_late_joiner_rebuilds_the_run_from_its_journal(run, tmp_path):
    docs, root, journal = run
    joined = first_index(docs, "event", 2)  # missed start, descriptors, resource, two frames
    # The journal as it was when the listener joined: up to and including the first doc it sees.
    with open(journal, "w") as fh:
        fh.writelines(encode_line(n, d) for n, d in docs[: joined + 1])
    pipeline, spool, out = listener(root, tmp_path / "spool")
    for name, doc in docs[joined:]:
        pipeline(name, doc)
    check_complete_run(out)
    assert pipeline.stats["recovered_runs"] == 1
    assert pipeline.stats["duplicates"] == 1  # the document that triggered the recovery
    spooled = list(replay_spool(spool.path_for(docs[0][1]["uid"])))
    assert [d["uid"] for _, d in spooled] == [d["uid"] for _, d in docs]
    # Stragglers of a finished run are dropped, not recovered a second time.
    pipeline(*docs[joined])
    assert pipeline.stats["late_for_finished_run"] == 1 and pipeline.stats["recovered_runs"] == 1


def test_restarted_listener_rebuilds_from_its_spool(run, tmp_path):
    docs, root, journal = run
    os.remove(journal)  # only the listener's own spool remains
    crash = first_index(docs, "event", 4)
    first, _, out1 = listener(root, tmp_path / "spool")
    for name, doc in docs[:crash]:
        first(name, doc)
    assert not any(isinstance(m, RunStopped) for m in out1)
    second, _, out2 = listener(root, tmp_path / "spool")
    for name, doc in docs[crash:]:
        second(name, doc)
    check_complete_run(out2)
    assert second.stats["recovered_runs"] == 1


def test_documents_wait_until_their_run_can_be_found(run, tmp_path):
    docs, root, journal = run
    hidden = journal + ".hidden"
    os.rename(journal, hidden)
    pipeline, _, out = listener(root, tmp_path / "spool", max_orphans=3)
    joined = first_index(docs, "event", 2)
    for name, doc in docs[joined : joined + 5]:
        pipeline(name, doc)
    assert out == [] and pipeline.n_orphans == 3
    assert pipeline.stats["orphans_dropped"] == 2
    os.rename(hidden, journal)
    pipeline.retry_orphans()
    assert pipeline.n_orphans == 0 and isinstance(out[0], RunHeader)
    for name, doc in docs[joined + 5 :]:
        pipeline(name, doc)
    check_complete_run(out)


def test_a_refused_document_does_not_stop_the_pipeline(run, tmp_path):
    docs, _, _ = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out, seen = [], []
    # The run's probe lies outside this assembler's data root: its start is refused, counted,
    # and every consumer still sees every document.
    assembler = RunAssembler(out.append, data_roots=[elsewhere])
    pipeline = DocumentPipeline([assembler, lambda name, doc: seen.append(name)])
    for name, doc in docs:
        pipeline(name, doc)
    assert len(seen) == len(docs) and out == []
    assert pipeline.stats["consumer_errors"] == 1
    assert "outside the data roots" in assembler.problems[0]
