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
#: The per-angle table's columns: (row key, header with units, decimals). θ in degrees; the time
#: is the angle's compute (both passes); losses are the engine's relative amplitude residuals.
TABLE_COLUMNS = (
    ("angle_id", "angle", None),
    ("angle_deg", "θ (°)", 2),
    ("frames", "frames", None),
    ("seconds", "time (s)", 3),
    ("loss", "loss (pass 2)", 4),
    ("loss_pass1", "loss (pass 1)", 4),
)
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


def _round(value: Any, digits: int | None) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if digits is None or not isinstance(value, float):
        return value
    # Significant digits for small and large losses, decimals for angles and times.
    if value != 0 and not 0.1 <= abs(value) < 1000:
        return float(f"{value:.{digits}g}")
    return round(value, digits)


def tiled_links(scan_uri: str | None) -> dict[str, str]:
    """The API and web-UI addresses of a scan container from its Tiled client URI.

    Tiled's client gives ``http://host:port/api/v1/metadata//<uid>`` (a double slash); the web
    UI shows the same node at ``http://host:port/ui/browse/<uid>``.
    """
    if not scan_uri:
        return {}
    head, sep, path = str(scan_uri).partition("/api/v1/metadata/")
    if not sep:
        return {"api": str(scan_uri)}
    path = re.sub(r"/+", "/", path).strip("/")
    return {"api": f"{head}/api/v1/metadata/{path}", "ui": f"{head}/ui/browse/{path}"}


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
    #: The volumes (and their PNGs) of the last reconstruction preview: a final announcement of
    #: the same volumes (N* reached on the last angle) reuses them instead of a second render.
    last_preview: tuple[dict, list[str]] | None = field(default=None, repr=False)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    #: frames_missing / angles_with_gaps of a done_with_gaps run
    gaps: dict[str, Any] = field(default_factory=dict)
    #: Prefect's cost per task kind (call wall time beyond the body) and per artifact kind.
    overhead_by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    artifact_by_kind: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    #: Each task's overhead and each angle's second-pass compute (they set the task granularity).
    task_overheads: list[float] = field(default_factory=list)
    angle_compute: list[float] = field(default_factory=list)
    #: Angles per finish-angles task, in order.
    groups: list[int] = field(default_factory=list)
    #: Work the flow did outside tasks (live previews), seconds per kind: neither compute nor
    #: Prefect's overhead.
    plain_s: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    live_updates: int = 0
    #: PNGs of the live (mid-scan) Approximant previews.
    live_previews: list[str] = field(default_factory=list)
    #: Artifact seconds of each live update (table, progress, image).
    live_costs: list[float] = field(default_factory=list)
    #: Live convergence estimates shown (closed loop; rows with a ``stop`` flag).
    convergence: list[dict[str, Any]] = field(default_factory=list)

    def record(self, kind: str, *, call_s: float, body_s: float, publish_s: float = 0.0,
               error: BaseException | None = None) -> None:
        """One task call: wall time around the call, time in its body (of which ``publish_s``
        published an angle), its error if any."""
        self.n_tasks += 1
        self.call_s += call_s
        self.body_s[kind] += body_s - publish_s
        self.body_s["angle_finished"] += publish_s
        over = max(0.0, call_s - body_s)
        self.overhead_by_kind[kind] += over
        self.task_overheads.append(over)
        if error is not None:
            self.errors.append(f"{kind}: {type(error).__name__}: {error}")

    def add_angle(self, summary: Any, compute_s: float | None = None) -> None:
        """A finished angle's row; ``compute_s``: its second pass as the flow timed it."""
        self.rows.append(angle_row(summary, default_id=len(self.rows)))
        if compute_s is not None:
            self.angle_compute.append(compute_s)

    def live_cost_s(self) -> float | None:
        """Median artifact cost of one live update so far (None: none yet)."""
        return sorted(self.live_costs)[len(self.live_costs) // 2] if self.live_costs else None

    def record_artifact(self, kind: str, seconds: float) -> None:
        self.artifact_s += seconds
        self.artifact_by_kind[kind] += seconds

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

    @property
    def scan_compute_s(self) -> float:
        """All of the scan's compute: both passes of every angle (the rows' times; the first
        pass runs on the worker, outside tasks) plus the reconstructions."""
        rows = sum(r["seconds"] for r in self.rows if math.isfinite(r.get("seconds", math.nan)))
        return rows + self.body_s["reconstruct"]

    def overhead_breakdown(self) -> dict[str, float]:
        """Prefect's cost by where it went: ``task:<kind>`` and ``artifact:<kind>`` (seconds)."""
        parts = {f"task:{k}": v for k, v in self.overhead_by_kind.items()}
        parts.update({f"artifact:{k}": v for k, v in self.artifact_by_kind.items()})
        return {k: round(v, 4) for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}

    def summary(self) -> dict[str, Any]:
        compute = self.compute_s
        scan_compute = self.scan_compute_s
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
            "scan_compute_s": round(scan_compute, 3),
            "prefect_overhead_pct_of_scan_compute": (
                round(100 * self.overhead_s / scan_compute, 2) if scan_compute else None),
            "prefect_overhead_breakdown_s": self.overhead_breakdown(),
            "angles_per_task": list(self.groups),
            "live_updates": self.live_updates,
            "live_previews": list(self.live_previews),
            "errors": list(self.errors),
            "frames_missing": int(self.gaps.get("frames_missing", 0)),
            "angles_with_gaps": list(self.gaps.get("angles_with_gaps", [])),
            "metrics": self.metrics,
            "previews": list(self.previews),
            "convergence_estimates": len(self.convergence),
            "stop_advised_at_n": next((r["n_angles"] for r in self.convergence if r.get("stop")),
                                      None),
        }

    def table(self) -> list[dict[str, Any]]:
        """Per-angle rows for a table artifact, by θ: rounded, units in the headers (see
        :data:`TABLE_COLUMNS`), NaN shown as empty."""
        return [
            {header: _round(r.get(key), digits) for key, header, digits in TABLE_COLUMNS}
            for r in sorted(self.rows, key=lambda r: r["angle_deg"])
        ]

    def markdown(self, *, tiled_uri: str | None, flow_run_url: str | None = None) -> str:
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
        if self.groups and max(self.groups) > 1:
            lines.append(f"| angles per finish-angles task | {', '.join(map(str, self.groups))} |")
        links = tiled_links(tiled_uri)
        if "ui" in links:
            lines.append(f"| Tiled (web UI) | [{links['ui']}]({links['ui']}) |")
        if "api" in links:
            lines.append(f"| Tiled (API) | `{links['api']}` |")
        if flow_run_url:
            lines.append(f"| Prefect | [{flow_run_url}]({flow_run_url}) |")
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


#: The convergence artifact's columns: (row key, header, decimals).
CONVERGENCE_TABLE = (
    ("n_angles", "angles", None),
    ("angle_deg", "newest θ (°)", 2),
    ("frc_half", "half-split FRC", 3),
    ("resolution", "resolution (× Nyquist)", 3),
    ("change", "change", 4),
    ("heldout_residual", "held-out residual", 4),
    ("seconds", "estimate (s)", 3),
)


def convergence_markdown(rows: list[Mapping[str, Any]], *, n_star: int | None = None) -> str:
    """The live convergence estimates of a scan as a markdown table (one row per estimate,
    the row where stop advice was given marked), for a Prefect markdown artifact."""
    head = "| " + " | ".join(h for _, h, _ in CONVERGENCE_TABLE) + " | advice |"
    lines = [head, "|" + " --- |" * (len(CONVERGENCE_TABLE) + 1)]
    for row in rows:
        cells = []
        for key, _, digits in CONVERGENCE_TABLE:
            value = _round(row.get(key), digits)
            cells.append("–" if value is None else str(value))
        cells.append("**stop**" if row.get("stop") else "")
        lines.append("| " + " | ".join(cells) + " |")
    stops = [r["n_angles"] for r in rows if r.get("stop")]
    tail = (f"\n\nStop advised at {stops[0]} angles" + (f" (N* = {n_star})" if n_star else "")
            + "." if stops else "")
    return "### Live convergence\n\n" + "\n".join(lines) + tail + "\n"
