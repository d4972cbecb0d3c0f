"""Closed-loop validation on simulated scans with truth: stop advice and adaptive angles.

For each held-out phantom seed (default 9100, 9101, ...) of a small preset (default ``tiny``):

1. Simulate the planned scan (29 angles over ±17°), run the streaming engine over every angle
   once, keeping each angle's back-rotated δ and its projections: the Approximant (and the
   network's SART channel) of any subset of angles is then a sum, not a new engine run.
2. **Stop advice**: stream the angles in coarse-to-fine (bisection) order through the live
   convergence estimate and the stop rule (the defaults of ``ConvergenceOptions`` /
   ``StopPolicy``); where it advises stopping, reconstruct (the shipped APT network, as live)
   from the angles in by then and compare with the full 29-angle scan: angles saved, PCC / DSC
   lost. The advice counts as **wrong** when it lost more than ``--tolerance`` (0.02) PCC or DSC.
3. **Adaptive vs uniform**: the next-angle ranking (``suggest_angles``: coverage gap x
   half-split disagreement) chooses angles one by one from the planned grid, starting from its
   two ends; at each N of ``--n-values`` the first N adaptive angles are compared with N angles
   spread uniformly over ±17° (``select_angles``), same network, same phantom. Also: the
   smallest N at which each reaches ``--target`` (0.98) of the full scan's PCC.

Results go to a JSON-lines file one phantom a line (``--out``; phantoms in it are skipped, so a
run resumes), and the tables to stdout as markdown (docs/closed-loop.md).

    python -m apt_stream.benchmarks.closed_loop --phantoms 12 --out closed-loop.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

N_VALUES = (5, 7, 9, 13, 17, 21, 29)


class SubsetReconstructor:
    """The APT volume of any subset of one scan's angles, from per-angle pieces kept once."""

    def __init__(self, scan, model) -> None:
        import torch

        from apt_stream.physics.engine import approximant_from_scan, slices_to_sample_frame

        self.scan, self.model = scan, model
        eng = approximant_from_scan(scan, keep_slices=True)
        self.angles = np.asarray(scan.angles_deg, dtype=float)
        self.pieces = []
        frame_px = int(np.asarray(scan.probe).shape[-1])
        for n in range(scan.n_angles):
            s = eng.summaries[n]
            vol, cover = slices_to_sample_frame(s.delta, shape_zyx=scan.volume_shape_zyx,
                                                frame_px=frame_px, angle_deg=s.angle_deg)
            self.pieces.append((vol, cover, s.projection, s.input_projection))
        self._torch = torch

    def projections(self, idx, refined: bool = True):
        idx = sorted(idx, key=lambda i: self.angles[i])
        k = 2 if refined else 3
        return self.angles[idx], np.stack([self.pieces[i][k] for i in idx])

    def approximant(self, idx) -> np.ndarray:
        total = sum(self.pieces[i][0] for i in idx)
        count = sum(self.pieces[i][1] for i in idx)
        return (total / self._torch.clamp(count, min=1.0)).cpu().numpy().astype(np.float32)

    def apt(self, idx) -> np.ndarray:
        from apt_stream.reconstruct import apt_volumes

        return apt_volumes(self.model, self.approximant(idx), projections=self.projections(idx),
                           input_projections=self.projections(idx, refined=False))["apt"]

    def quality(self, idx) -> dict[str, float]:
        from apt_stream.reconstruct import score

        m = score({"apt": self.apt(idx)}, self.scan.truth)["apt"]
        return {"pcc": m["pcc"], "dsc": m["dsc"]}


def stop_run(rec: SubsetReconstructor, convergence=None, stop=None) -> dict:
    """Stream in bisection order through the estimate and the stop rule: where it stops."""
    from apt_stream.physics.convergence import ConvergenceMonitor, ConvergenceOptions
    from apt_stream.physics.next_angle import bisection_order
    from apt_stream.stream.trigger import StopPolicy, TriggerPolicy

    scan = rec.scan
    opts = convergence or ConvergenceOptions(budget_share=None)
    mon = ConvergenceMonitor(scan.volume_shape_zyx, opts)
    state = (stop or StopPolicy()).new_run(TriggerPolicy(n_star=scan.n_angles,
                                                         theta_star_deg=17.0, tol_deg=0.5))
    order = bisection_order(scan.n_angles)
    n_stop, seconds = scan.n_angles, []
    for k in range(1, len(order) + 1):
        idx = order[:k]
        a, p = rec.projections(idx)
        row = mon.update(a, p, newest_deg=float(rec.angles[order[k - 1]]))
        if row is None:
            continue
        seconds.append(row.seconds)
        if state.update(row.as_row(), a) is not None:
            n_stop = k
            break
    return {"n_stop": n_stop, "order": order, "estimate_s": float(np.mean(seconds))}


def adaptive_order(rec: SubsetReconstructor, n_max: int) -> list[int]:
    from apt_stream.physics.next_angle import suggest_angles

    grid = rec.angles
    chosen = [int(np.argmin(grid)), int(np.argmax(grid))]
    while len(chosen) < n_max:
        best = suggest_angles(grid[chosen], grid, projections=rec.projections(chosen),
                              volume_shape_zyx=rec.scan.volume_shape_zyx, k=1)
        if not best:
            break
        chosen.append(int(np.argmin(np.abs(grid - best[0].angle_deg))))
    return chosen


def one_phantom(seed: int, preset: str, model, n_values, tolerance: float) -> dict:
    from apt_stream.config import get_preset, select_angles
    from apt_stream.sim.acquire import simulate_scan

    t0 = time.perf_counter()
    scan = simulate_scan(get_preset(preset), seed=seed, n_angles=29, range_deg=17.0)
    rec = SubsetReconstructor(scan, model)
    full = rec.quality(list(range(scan.n_angles)))
    st = stop_run(rec)
    at_stop = rec.quality(st["order"][: st["n_stop"]])
    adaptive = adaptive_order(rec, max(n_values))
    curves = {"adaptive": {}, "uniform": {}}
    for n in n_values:
        curves["adaptive"][n] = rec.quality(adaptive[:n])
        curves["uniform"][n] = rec.quality(list(select_angles(rec.angles, n, 17.0)))
    lost = {k: round(full[k] - at_stop[k], 4) for k in ("pcc", "dsc")}
    return {
        "seed": seed, "preset": preset, "n_full": scan.n_angles, "full": full,
        "n_stop": st["n_stop"], "at_stop": at_stop, "lost": lost,
        "wrong": bool(max(lost.values()) > tolerance), "estimate_s": st["estimate_s"],
        "curves": curves, "seconds": round(time.perf_counter() - t0, 1),
    }


def n_to_reach(curve: dict, target: float) -> int | None:
    for n in sorted(curve, key=int):
        if curve[n]["pcc"] >= target:
            return int(n)
    return None


def tables(results: list[dict], target_share: float, tolerance: float) -> str:
    r = results
    n_full = r[0]["n_full"]
    saved = np.array([n_full - x["n_stop"] for x in r])
    lines = [
        f"Phantoms: {len(r)} ({r[0]['preset']} preset, seeds {r[0]['seed']}…{r[-1]['seed']}), "
        f"planned scan {n_full} angles over ±17°, reconstruction: the shipped APT network.",
        "",
        "| stop advice | mean | min | max |",
        "| --- | --- | --- | --- |",
        f"| angles at stop | {np.mean([x['n_stop'] for x in r]):.1f} | "
        f"{min(x['n_stop'] for x in r)} | {max(x['n_stop'] for x in r)} |",
        f"| angles saved (of {n_full}) | {saved.mean():.1f} ({100 * saved.mean() / n_full:.0f} %) "
        f"| {saved.min()} | {saved.max()} |",
    ]
    for k in ("pcc", "dsc"):
        full = [x["full"][k] for x in r]
        stop = [x["at_stop"][k] for x in r]
        lost = [x["lost"][k] for x in r]
        lines.append(f"| {k.upper()} full scan → at stop | {np.mean(full):.4f} → "
                     f"{np.mean(stop):.4f} | | |")
        lines.append(f"| {k.upper()} lost | {np.mean(lost):+.4f} | {min(lost):+.4f} | "
                     f"{max(lost):+.4f} |")
    wrong = sum(x["wrong"] for x in r)
    lines += [
        f"| advice wrong (lost > {tolerance} PCC or DSC) | {wrong} of {len(r)} "
        f"({100 * wrong / len(r):.0f} %) | | |",
        f"| estimate cost per angle (s, {r[0]['preset']}) | "
        f"{np.mean([x['estimate_s'] for x in r]):.4f} | | |",
        "",
        "| N | adaptive PCC | uniform PCC | adaptive DSC | uniform DSC |",
        "| --- | --- | --- | --- | --- |",
    ]
    ns = sorted(r[0]["curves"]["adaptive"], key=int)
    for n in ns:
        vals = [np.mean([x["curves"][m][n][k] for x in r])
                for k in ("pcc",) for m in ("adaptive", "uniform")]
        vals += [np.mean([x["curves"][m][n]["dsc"] for x in r]) for m in ("adaptive", "uniform")]
        lines.append(f"| {n} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    reach = {m: [n_to_reach(x["curves"][m], target_share * x["full"]["pcc"]) for x in r]
             for m in ("adaptive", "uniform")}
    lines += ["", f"| N to reach {target_share:g} × the full scan's PCC | mean | never |",
              "| --- | --- | --- |"]
    for m, vals in reach.items():
        got = [v for v in vals if v is not None]
        lines.append(f"| {m} | {np.mean(got):.1f} | {len(vals) - len(got)} |" if got
                     else f"| {m} | – | {len(vals)} |")
    return "\n".join(lines)


def run(*, phantoms: int = 12, first_seed: int = 9100, preset: str = "tiny",
        n_values=N_VALUES, tolerance: float = 0.02, target: float = 0.98,
        out: str | Path | None = "closed-loop.jsonl", say=print) -> list[dict]:
    """The per-phantom results (resumed from ``out`` where there; None: no file)."""
    from apt_stream.reconstruct import load_model

    model, _ = load_model()
    path = Path(out) if out is not None else None
    done = {}
    if path is not None and path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            done[(rec["seed"], rec["preset"])] = rec
    n_values = [int(v) for v in n_values]
    results = []
    for seed in range(first_seed, first_seed + phantoms):
        rec = done.get((seed, preset))
        if rec is None:
            rec = one_phantom(seed, preset, model, n_values, tolerance)
            if path is not None:
                with path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            if say is not None:
                say(f"seed {seed}: stop at {rec['n_stop']}, lost {rec['lost']}, "
                    f"{rec['seconds']} s")
        results.append(rec)
    # JSON keys are strings: one form for resumed and fresh results.
    return [json.loads(json.dumps(r)) for r in results]


def headline(results: list[dict], target: float = 0.98) -> dict:
    """The tables' main figures as numbers (``apt-stream bench closed-loop``)."""
    n_full = results[0]["n_full"]
    saved = [n_full - x["n_stop"] for x in results]
    reach = {m: [n_to_reach(x["curves"][m], target * x["full"]["pcc"]) for x in results]
             for m in ("adaptive", "uniform")}
    return {
        "phantoms": len(results), "preset": results[0]["preset"], "planned_angles": n_full,
        "angles_at_stop_mean": float(np.mean([x["n_stop"] for x in results])),
        "angles_saved_mean": float(np.mean(saved)),
        "pcc_lost_mean": float(np.mean([x["lost"]["pcc"] for x in results])),
        "dsc_lost_mean": float(np.mean([x["lost"]["dsc"] for x in results])),
        "advice_wrong": int(sum(x["wrong"] for x in results)),
        "estimate_s_per_angle": float(np.mean([x["estimate_s"] for x in results])),
        "n_to_reach_target": {m: [v for v in vals] for m, vals in reach.items()},
    }


def run_all(*, quick: bool = False, phantoms: int | None = None, preset: str | None = None,
            out: str | None = None) -> dict:
    """``apt-stream bench closed-loop``: headline figures and the markdown tables. ``quick``:
    2 tiny-preset phantoms at N = 5, 9, 29, no results file."""
    preset = preset or "tiny"
    if quick:
        results = run(phantoms=phantoms or 2, preset=preset, n_values=(5, 9, 29), out=out,
                      say=None)
    else:
        results = run(phantoms=phantoms or 12, preset=preset, out=out, say=None)
    return {**headline(results), "tables_markdown": tables(results, 0.98, 0.02)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantoms", type=int, default=12)
    ap.add_argument("--first-seed", type=int, default=9100)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--n-values", default=",".join(map(str, N_VALUES)))
    ap.add_argument("--tolerance", type=float, default=0.02)
    ap.add_argument("--target", type=float, default=0.98)
    ap.add_argument("--out", default="closed-loop.jsonl")
    args = ap.parse_args(argv)
    results = run(phantoms=args.phantoms, first_seed=args.first_seed, preset=args.preset,
                  n_values=args.n_values.split(","), tolerance=args.tolerance,
                  target=args.target, out=args.out, say=lambda m: print(m, flush=True))
    print(tables(results, args.target, args.tolerance))


if __name__ == "__main__":
    main()
