"""Do the live convergence signals predict where a phantom's scan could safely stop?

``python -m apt_stream.benchmarks.stop_signals benchmarks/results/stop-rule-tuning-tiny.jsonl``

Reads a stop-rule tuning file (per phantom: the convergence rows and the APT quality after every
angle of the bisection order, written by ``closed_loop``), finds each phantom's *safe stop*: the
first N from which the loss against the full scan (PCC or DSC, whichever is larger) stays within
``--tol`` (0.02, the closed-loop tables' "wrong" line), and ranks the live signals at N = 12 and
14 against it (Spearman). A sample-adaptive stop rule needs a signal that ranks phantoms like
this; docs/closed-loop.md reports what it found.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def safe_stop(record: dict, tol: float) -> int:
    ns = sorted(int(n) for n in record["quality"])
    full = record["quality"][str(ns[-1])]
    loss = {n: max(full["pcc"] - record["quality"][str(n)]["pcc"],
                   full["dsc"] - record["quality"][str(n)]["dsc"]) for n in ns}
    return next(n for n in ns if all(loss[m] <= tol for m in ns if m >= n))


def signals(record: dict, at: int) -> dict[str, float]:
    rows = record["rows"]
    out = {f"{k}@{at}": float(rows[str(at)][k]) for k in ("change", "frc_half", "heldout_residual")}
    out[f"mean change 10..{at}"] = statistics.mean(
        float(rows[str(m)]["change"]) for m in range(10, at + 1))
    out[f"frc gain 9..{at}"] = float(rows[str(at)]["frc_half"]) - float(rows["9"]["frc_half"])
    return out


def main(argv: list[str] | None = None) -> dict:
    from scipy.stats import spearmanr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tuning_file", type=Path)
    ap.add_argument("--tol", type=float, default=0.02)
    args = ap.parse_args(argv)
    records = [json.loads(line) for line in args.tuning_file.read_text().splitlines() if line.strip()]
    safe = [safe_stop(r, args.tol) for r in records]
    table: dict[str, list[float]] = {}
    for r in records:
        for at in (12, 14):
            for k, v in signals(r, at).items():
                table.setdefault(k, []).append(v)
    result = {"phantoms": len(records), "safe_stop": safe, "spearman": {}}
    print(f"{len(records)} phantoms; safe stop N: {safe} (range {min(safe)}–{max(safe)})")
    for k, v in table.items():
        rho, p = spearmanr(v, safe)
        result["spearman"][k] = {"rho": float(rho), "p": float(p)}
        print(f"  {k:24s} Spearman rho {rho:+.2f} (p {p:.2f})")
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
