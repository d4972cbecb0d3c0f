"""``python -m apt_stream.publish serve CONFIG [options]``: ``tiled serve config`` with its output
redacted (no API key in the terminal or a log file); see
:func:`apt_stream.publish.server.serve_tiled`."""

from __future__ import annotations

import sys

from apt_stream.publish.server import SERVE_USAGE, serve_tiled


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "serve":
        sys.stderr.write(SERVE_USAGE)
        return 2
    return serve_tiled(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())
