"""`make bench`: its table, with the console as quiet as the training scripts'."""

from __future__ import annotations

import pytest
from test_train import NOISE

from conftest import ROOT, run_script


@pytest.mark.integration  # `python -m mnistlab.bench` on the real MNIST in data/ (fetched when missing)
@pytest.mark.slow  # two compiles of the network: a few minutes on 2 cores
def test_bench_prints_its_table_and_none_of_the_libraries_noise():
    result = run_script(
        "-m", "mnistlab.bench", "batches=2", "repeats=1", "workers=0", "compile=true",
        f"data_dir={ROOT / 'data'}", timeout=600,
    )  # fmt: skip
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert [noise for noise in NOISE if noise in console] == []
    assert "GPU available" not in console and "`Trainer.fit` stopped" not in console
    for row in ["(a) raw loop", "(b) train.py path", "(b*) uncompiled, bf16", "(b'') compiled, bf16", "peak"]:
        assert row in console, row
