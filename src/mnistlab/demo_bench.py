"""Latency of the demo page as a user feels it: `python -m mnistlab.demo_bench [calls=20]`.

Starts `demo.py` on a free port, then times calls from another process over HTTP with
gradio_client, as the page's own requests travel: a drawing on the 280x280 canvas (`/draw`)
and an uploaded MNIST test digit (`/predict`). Prints the median and the slowest call of each.
"""

from __future__ import annotations

import statistics
import time

import hydra

from mnistlab import PROJECT_ROOT
from mnistlab.cli import launch, one_line_errors
from mnistlab.demo import running


def bench(calls: int) -> dict[str, list[float]]:
    """Seconds of each of `calls` calls per endpoint, after one warm-up call each."""
    from gradio_client import Client, handle_file

    drawing = PROJECT_ROOT / "docs" / "demo" / "drawn-three.png"  # a 3 drawn on the 280x280 canvas
    digit = PROJECT_ROOT / "docs" / "demo" / "mnist-test-0018-3.png"
    with running() as url:
        client = Client(url, verbose=False)
        cases = {
            "/draw    a 3 drawn on the 280x280 canvas": (
                lambda: {"background": None, "layers": [], "composite": handle_file(drawing)}, "/draw"),
            "/predict an MNIST test digit, uploaded": (lambda: handle_file(digit), "/predict"),
        }  # fmt: skip
        print(f"{calls} calls each from another process over HTTP ({url}), after one warm-up call")
        times = {}
        for name, (value, endpoint) in cases.items():
            answer, _, _ = client.predict(value(), api_name=endpoint)
            assert answer["label"] == "3", answer
            times[name] = []
            for _ in range(calls):
                start = time.perf_counter()
                client.predict(value(), api_name=endpoint)
                times[name].append(time.perf_counter() - start)
            print(
                f"{name}: median {statistics.median(times[name]) * 1000:.0f} ms, "
                f"slowest {max(times[name]) * 1000:.0f} ms"
            )
    return times


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "conf"), config_name="demo_bench")
@one_line_errors
def main(cfg) -> None:
    bench(cfg.calls)


if __name__ == "__main__":
    launch(main)
