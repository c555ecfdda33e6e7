"""Latency of the demo page as a user feels it: `python -m mnistlab.demo_bench [--calls 20]`.

Starts `demo.py` on a free port, then times calls from another process over HTTP with
gradio_client, as the page's own requests travel: a drawing on the 280x280 canvas (`/draw`)
and an uploaded MNIST test digit (`/predict`). Prints the median and the slowest call of each.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

from mnistlab import PROJECT_ROOT

# A "3" as a person draws it: two bows, as fractions of the canvas (x, y).
THREE = [
    [(0.30, 0.22), (0.42, 0.15), (0.58, 0.15), (0.68, 0.24), (0.66, 0.36), (0.55, 0.46), (0.45, 0.48)],
    [(0.45, 0.48), (0.60, 0.52), (0.70, 0.62), (0.70, 0.74), (0.60, 0.84), (0.44, 0.86), (0.30, 0.80)],
]


def drawn_three(pen: int = 24, side: int = 280) -> Image.Image:
    """THREE in black on a white canvas, as the page's sketchpad sends it."""
    canvas = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    for stroke in THREE:
        points = [(x * side, y * side) for x, y in stroke]
        ImageDraw.Draw(canvas).line(points, fill=(0, 0, 0, 255), width=pen, joint="curve")
    return canvas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def demo_server(*overrides: str, timeout: float = 180):
    """`python demo.py port=<free> ...` in a subprocess; yields its URL once it answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "demo.py", f"port={port}", *overrides], cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    try:
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    server.kill()
                    raise RuntimeError(
                        f"demo.py did not serve {url}:\n{server.stdout.read()[-3000:]}"
                    ) from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    from gradio_client import Client, handle_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, demo_server() as url:
        drawing = Path(tmp) / "three.png"
        drawn_three().save(drawing)
        digit = PROJECT_ROOT / "docs" / "demo" / "mnist-test-0018-3.png"
        client = Client(url, verbose=False)
        cases = {
            "/draw    a 3 drawn on the 280x280 canvas": (
                lambda: {"background": None, "layers": [], "composite": handle_file(drawing)}, "/draw"),
            "/predict an MNIST test digit, uploaded": (lambda: handle_file(digit), "/predict"),
        }  # fmt: skip
        print(f"{args.calls} calls each from another process over HTTP ({url}), after one warm-up call")
        for name, (value, endpoint) in cases.items():
            answer, _, _ = client.predict(value(), api_name=endpoint)
            assert answer["label"] == "3", answer
            times = []
            for _ in range(args.calls):
                start = time.perf_counter()
                client.predict(value(), api_name=endpoint)
                times.append(time.perf_counter() - start)
            print(
                f"{name}: median {statistics.median(times) * 1000:.0f} ms, slowest {max(times) * 1000:.0f} ms"
            )


if __name__ == "__main__":
    main()
