"""Serves a local wheel directory and a CA bundle on the host's loopback for image builds.

Where no index has the wheel an image needs (here: torch==2.13.0+cpu lies in /opt/wheels)
and pip needs the host's CA bundle, a build on the host's network fetches both from here:
  python3 compose/build-house.py [--wheels DIR] [--ca FILE] [--port N] &
  export GPUFAAS_WHEELS_URL=http://127.0.0.1:N/wheels/ GPUFAAS_PIP_CERT_URL=http://127.0.0.1:N/ca.pem
Only those two paths are served, and only on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
from pathlib import Path


def make_root(root: Path, wheels: Path, ca: Path) -> None:
    """ROOT/wheels/ links every wheel of WHEELS; ROOT/ca.pem links CA."""
    (root / "wheels").mkdir(parents=True, exist_ok=True)
    for wheel in sorted(wheels.glob("*.whl")):
        link = root / "wheels" / wheel.name
        if not link.exists():
            link.symlink_to(wheel)
    if ca.is_file() and not (root / "ca.pem").exists():
        (root / "ca.pem").symlink_to(ca)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Quiet: a build fetches the wheel listing once per requirement."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, default=Path("/opt/wheels"))
    parser.add_argument("--ca", type=Path, default=Path("/etc/ssl/certs/ca-certificates.crt"))
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--root", type=Path, default=Path(f"/tmp/gpufaas-build-house-{os.getuid()}")
    )
    args = parser.parse_args()
    make_root(args.root, args.wheels, args.ca)
    handler = functools.partial(_Handler, directory=str(args.root))
    with http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler) as server:
        print(f"serving {args.root} on http://127.0.0.1:{args.port}/", flush=True)
        server.serve_forever()


if __name__ == "__main__":
    main()
