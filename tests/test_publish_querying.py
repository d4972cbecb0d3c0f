"""docs/querying.md's code, run as written against a real Tiled server holding a published scan."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import numpy as np
import pytest

from apt_stream.publish import TiledPublisher

DOC = Path(__file__).resolve().parents[1] / "docs" / "querying.md"
SHAPE = (6, 8, 10)


def doc_code() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 2, "docs/querying.md lost its code blocks"
    return "\n".join(blocks)


@pytest.fixture
def published_scan(tiled_root, tmp_path):
    """A finished 29-angle scan of sample ic-demo with scan id 42, published the live way."""
    from tiled.queries import Key

    # The documented query names scan 42: make sure this session holds exactly one.
    for uid in list(tiled_root.search(Key("scan_id") == 42)):
        tiled_root[uid].update_metadata(metadata={"scan_id": -42})
    run_uid = f"doc-{uuid.uuid4()}"
    publisher = TiledPublisher(tiled_root, backup_dir=tmp_path / "backup")
    publisher.run_started({"run_uid": run_uid, "scan_id": 42, "sample": "ic-demo",
                           "volume_shape_zyx": list(SHAPE), "voxel_size_m": 14e-9})
    rng = np.random.default_rng(1)
    for n, angle in enumerate(np.linspace(-17, 17, 29)):
        publisher.angle_finished(run_uid, {"angle_id": n, "angle_deg": angle, "n_frames": 9,
                                           "seconds": 0.1, "loss_pass2": 1.0 / (n + 1)},
                                 rng.random(SHAPE))
    apt = rng.random(SHAPE).astype(np.float32)
    publisher.reconstruction_ready(run_uid, {"apt": apt}, final=True)
    publisher.run_stopped(run_uid, "success")
    return run_uid, apt


def test_documented_snippet_finds_the_scan_and_slices_it(published_scan, tiled_server,
                                                         monkeypatch):
    run_uid, apt = published_scan
    monkeypatch.setenv("APT_STREAM_TILED_URI", tiled_server.uri)
    monkeypatch.setenv("APT_STREAM_TILED_API_KEY", tiled_server.api_key)
    namespace: dict = {}
    exec(compile(doc_code(), str(DOC), "exec"), namespace)

    assert run_uid in namespace["done"]
    assert namespace["scan"].metadata["run_uid"] == run_uid
    np.testing.assert_array_equal(namespace["layer"], apt[SHAPE[0] // 2])
    np.testing.assert_array_equal(namespace["section"], apt[:, SHAPE[1] // 2, :])
    np.testing.assert_array_equal(namespace["whole"], apt)
    assert len(namespace["angles"]) == 29
