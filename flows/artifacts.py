"""What a scan's flow shows in Prefect: bookkeeping and artifact contents (no Prefect import).

:class:`ScanBook` collects, as the run's calls go by, the per-angle rows, task timings (time in
task bodies vs. time including Prefect's own work), reconstructions and metrics; it renders the
progress percentage, the table rows and the markdown summary.
"""

from __future__ import annotations

import base64
import math
import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apt_stream.publish import angle_row

#: Task kinds whose bodies are the scan's compute (the rest is bookkeeping and I/O).
COMPUTE_KINDS = ("finish_angle", "reconstruct")
#: Task kinds that write to Tiled.
PUBLISH_KINDS = ("run_started", "angle_finished", "reconstruction_ready", "run_stopped",
                 "publish_metrics")


def artifact_key(run_uid: str) -> str:
    """A Prefect artifact key for a run: lowercase letters, digits and dashes only."""
    key = re.sub(r"[^a-z0-9-]+", "-", run_uid.lower()).strip("-")
    return f"scan-{key[:48] or 'unnamed'}"


def png_data_url(path: str | Path) -> str:
    """A PNG file as a ``data:`` URL, which an image artifact displays without a file server."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def group_by_shape(volumes: Mapping[str, Any]) -> list[dict[str, np.ndarray]]:
    """Volumes split into groups of one shape (a section figure needs one grid per figure)."""
    groups: dict[tuple, dict[str, np.ndarray]] = defaultdict(dict)
    for name, volume in volumes.items():
        arr = np.asarray(volume)
        groups[arr.shape][name] = arr
    return list(groups.values())


@dataclass
class ScanBook:
    """Running record of one scan's flow."""

    run_uid: str
    n_star: int
    theta_star_deg: float
    rows: list[dict[str, Any]] = field(default_factory=list)
    body_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    call_s: float = 0.0
    artifact_s: float = 0.0
    n_tasks: int = 0
    errors: list[str] = field(default_factory=list)
    status: str | None = None
    reconstructions: int = 0
    previews: list[str] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: frames_missing / angles_with_gaps of a done_with_gaps run
    gaps: dict[str, Any] = field(default_factory=dict)

    def record(self, kind: str, *, call_s: float, body_s: float, publish_s: float = 0.0,
               error: BaseException | None = None) -> None:
        """One task call: wall time around the call, time in its body (of which ``publish_s``
        published an angle), its error if any."""
        self.n_tasks += 1
        self.call_s += call_s
        self.body_s[kind] += body_s - publish_s
        self.body_s["angle_finished"] += publish_s
        if error is not None:
            self.errors.append(f"{kind}: {type(error).__name__}: {error}")

    def add_angle(self, summary: Any) -> None:
        self.rows.append(angle_row(summary, default_id=len(self.rows)))

    @property
    def progress_pct(self) -> float:
        """Finished angles as a share of N* (capped at 100)."""
        return min(100.0, 100.0 * len(self.rows) / max(self.n_star, 1))

    @property
    def compute_s(self) -> float:
        return sum(self.body_s[k] for k in COMPUTE_KINDS)

    @property
    def overhead_s(self) -> float:
        """Task calls beyond their bodies, plus artifact writes: what Prefect cost."""
        return max(0.0, self.call_s - sum(self.body_s.values())) + self.artifact_s

    def summary(self) -> dict[str, Any]:
        compute = self.compute_s
        return {
            "run_uid": self.run_uid,
            "status": self.status,
            "angles": len(self.rows),
            "frames": int(sum(r["frames"] for r in self.rows)),
            "reconstructions": self.reconstructions,
            "tasks": self.n_tasks,
            "compute_s": round(compute, 3),
            "task_body_s": {k: round(v, 3) for k, v in self.body_s.items()},
            "prefect_overhead_s": round(self.overhead_s, 3),
            "prefect_overhead_pct": round(100 * self.overhead_s / compute, 2) if compute else None,
            "errors": list(self.errors),
            "frames_missing": int(self.gaps.get("frames_missing", 0)),
            "angles_with_gaps": list(self.gaps.get("angles_with_gaps", [])),
            "metrics": self.metrics,
            "previews": list(self.previews),
        }

    def table(self) -> list[dict[str, Any]]:
        """Per-angle rows for a table artifact (NaN shown as empty)."""
        return [
            {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
            for r in sorted(self.rows, key=lambda r: r["angle_deg"])
        ]

    def markdown(self, *, tiled_uri: str | None) -> str:
        s = self.summary()
        pct = s["prefect_overhead_pct"]
        lines = [
            f"## Scan `{self.run_uid}`: {self.status or 'running'}",
            "",
            "| | |",
            "|---|---|",
            f"| angles finished | {s['angles']} (trigger: N* = {self.n_star} within "
            f"±{self.theta_star_deg:g}°) |",
            f"| frames | {s['frames']}"
            + (f" ({s['frames_missing']} missing, angles {s['angles_with_gaps']})"
               if s["frames_missing"] or s["angles_with_gaps"] else "") + " |",
            f"| angle compute (second pass, in finish-angle tasks) | "
            f"{self.body_s['finish_angle']:.2f} s |",
            f"| reconstructions | {self.reconstructions} ({self.body_s['reconstruct']:.2f} s) |",
            f"| Tiled writes | {self._publish_s():.2f} s |",
            f"| Prefect overhead | {s['prefect_overhead_s']:.3f} s over {self.n_tasks} tasks"
            + (f" ({pct:.2f} % of compute) |" if pct is not None else " |"),
        ]
        if tiled_uri:
            lines.append(f"| Tiled | <{tiled_uri}> |")
        for p in self.previews:
            lines.append(f"| preview | `{p}` |")
        if self.metrics:
            names = sorted({m for row in self.metrics.values() for m in row})
            lines += ["", "### Against ground truth", "",
                      "| volume | " + " | ".join(names) + " |",
                      "|---|" + "---|" * len(names)]
            for vol, row in self.metrics.items():
                cells = [f"{row[m]:.4f}" if m in row else "" for m in names]
                lines.append(f"| {vol} | " + " | ".join(cells) + " |")
        if self.errors:
            lines += ["", "### Errors", ""] + [f"- {e}" for e in self.errors]
        return "\n".join(lines) + "\n"

    def _publish_s(self) -> float:
        return sum(self.body_s[k] for k in PUBLISH_KINDS)
