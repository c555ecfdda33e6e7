"""`trainer.precision=auto`: the choice from given facts, and the choice on this machine's real CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mnistlab.precision import BF16, FP32, choose_precision, cpu_flags, trainer_precision
from mnistlab.train import train

CPUINFO = Path("/proc/cpuinfo")
AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}  # AMD Zen 4
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}  # Intel Sapphire Rapids and later


@pytest.mark.parametrize(
    "device, flags, cuda_bf16, expected",
    [
        ("cpu", AMX, False, FP32),  # faster in bf16, but parity with the fp32 recipes unmeasured
        ("cpu", AVX512_BF16, False, FP32),  # no matrix unit: bf16 measured slower than fp32
        ("cpu", AVX2, False, FP32),
        ("cpu", set(), False, FP32),
        ("cuda", set(), True, BF16),
        ("cuda", set(), False, FP32),  # a GPU before Ampere
        ("mps", AMX, True, FP32),
    ],
    ids=["amx", "avx512_bf16-only", "avx2-only", "no-flags", "cuda-bf16", "cuda-old", "mps"],
)
def test_precision_chosen_from_the_given_facts(device, flags, cuda_bf16, expected):
    precision, why = choose_precision(device, flags, cuda_bf16)
    assert precision == expected and why


def test_auto_on_this_cpu_follows_its_real_flags():
    flags = cpu_flags()  # this machine's /proc/cpuinfo, read as the training run reads it
    precision, why = trainer_precision({"precision": "auto", "accelerator": "cpu"})
    assert (precision, why) == (
        choose_precision("cpu", flags, False)[0],
        "trainer.precision=auto on cpu: " + choose_precision("cpu", flags, False)[1],
    )
    if not torch.cuda.is_available():
        assert trainer_precision({"precision": "auto", "accelerator": "auto"})[0] == precision


@pytest.mark.skipif(not CPUINFO.is_file(), reason="no /proc/cpuinfo")
def test_cpu_flags_are_the_kernels_list():
    flags = cpu_flags()
    line = next(x for x in CPUINFO.read_text().splitlines() if x.startswith("flags"))
    assert flags == set(line.split(":", 1)[1].split()) and len(flags) > 10


@pytest.mark.parametrize("given", ["32-true", "bf16-mixed", 32])
def test_an_explicit_precision_wins(given):
    precision, why = trainer_precision({"precision": given, "accelerator": "cpu"})
    assert precision == str(given) and "was given" in why


def test_a_run_says_which_precision_it_chose_and_why(compose_train, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mnistlab")
    train(compose_train("debug=fdr"), tmp_path)  # no precision override: `auto`
    expected, why = trainer_precision({"precision": "auto", "accelerator": "auto"})
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert (recorded["precision"], recorded["precision_why"]) == (expected, why)
    assert f"precision: {expected} ({why})" in caplog.text


@pytest.mark.integration
def test_the_train_script_prints_the_chosen_precision(script_run):
    run_dir, result = script_run
    recorded = json.loads((run_dir / "metrics.json").read_text())
    assert (
        f"precision: {recorded['precision']} ({recorded['precision_why']})" in result.stdout + result.stderr
    )


def test_an_explicit_precision_is_recorded_as_given(compose_train, tmp_path):
    train(compose_train("debug=fdr", "trainer.accelerator=cpu", "trainer.precision=bf16-mixed"), tmp_path)
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert recorded["precision"] == "bf16-mixed"
    assert recorded["precision_why"] == "trainer.precision=bf16-mixed was given"
