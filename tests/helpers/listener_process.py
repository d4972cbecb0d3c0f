"""A listener process for the crash/restart tests: the library's live path as a beamline runs it
(Listener with spool and recovery -> LiveReconstructor with the real physics engine and a network
checkpoint -> TiledPublisher), without Prefect. Prints ``READY`` once subscribed and
``FINISHED <json>`` after ``--runs`` runs ended, then exits 0. The Tiled address and key come from
``APT_STREAM_TILED_URI`` / ``APT_STREAM_TILED_API_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--backup", required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--n-star", type=int, default=3)
    parser.add_argument("--theta", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()

    from apt_stream.flows.wiring import engine_factory, model_reconstructor
    from apt_stream.publish import TiledPublisher
    from apt_stream.publish.server import TiledEndpoint
    from apt_stream.stream import Listener, LiveReconstructor, TriggerPolicy

    endpoint = TiledEndpoint(uri=os.environ["APT_STREAM_TILED_URI"],
                             api_key=os.environ["APT_STREAM_TILED_API_KEY"])
    publisher = TiledPublisher.from_endpoint(endpoint, backup_dir=args.backup, run_metadata={},
                                             approximant_every_s=0.0)
    reconstruct, _ = model_reconstructor(args.checkpoint)
    finished: list[tuple[str, str]] = []
    all_done = threading.Event()
    listener: Listener | None = None

    def on_finished(run_uid: str, status: str) -> None:
        listener.mark_done(run_uid, status)
        finished.append((run_uid, status))
        if len(finished) >= args.runs:
            all_done.set()

    live = LiveReconstructor(publisher, engine_factory=engine_factory(), reconstruct_fn=reconstruct,
                             policy=TriggerPolicy(n_star=args.n_star, theta_star_deg=args.theta),
                             on_run_finished=on_finished)
    listener = Listener(args.proxy, emit=live.submit, data_roots=[args.data_root],
                        spool_dir=args.spool).start()
    print("READY", flush=True)
    ok = all_done.wait(args.timeout)
    listener.stop()
    live.close()
    print("FINISHED", json.dumps({"finished": finished, "timed_out": not ok,
                                  "listener": listener.stats()}, default=str), flush=True)


if __name__ == "__main__":
    main()
