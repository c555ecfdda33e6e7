"""`trainer.precision=auto`: the choice from given facts, and the choice on this machine's real CPU."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from mnistlab.evaluate import evaluate
from mnistlab.precision import BF16, FP32, choose_precision, cpu_flags, trainer_precision
from mnistlab.train import train

CPUINFO = Path("/proc/cpuinfo")
AVX2 = {"sse4_2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}  # AMD Zen 4
AMX = AVX512_BF16 | {"amx_tile", "amx_bf16", "amx_int8"}  # Intel Sapphire Rapids and later


@pytest.mark.parametrize(
    "device, flags, cuda_bf16, compiled, expected",
    [
        ("cpu", AMX, False, True, BF16),
        ("cpu", AVX512_BF16, False, True, BF16),  # Zen 4: compiled bf16 1.4x as fast as fp32
        ("cpu", AMX, False, False, FP32),  # uncompiled bf16: 5% faster on Zen 4, not worth it
        ("cpu", AVX512_BF16, False, False, FP32),
        ("cpu", AVX2, False, True, FP32),  # bf16 emulated: several times slower
        ("cpu", set(), False, True, FP32),
        ("cuda", set(), True, False, BF16),
        ("cuda", set(), False, True, FP32),  # a GPU before Ampere
        ("mps", AMX, True, True, FP32),
    ],
    ids=["amx", "avx512_bf16", "amx-uncompiled", "avx512_bf16-uncompiled", "avx2", "no-flags",
         "cuda-bf16", "cuda-old", "mps"],
)  # fmt: skip
def test_precision_chosen_from_the_given_facts(device, flags, cuda_bf16, compiled, expected):
    precision, why = choose_precision(device, flags, cuda_bf16, compiled)
    assert precision == expected and why


@pytest.mark.parametrize("compiled", [True, False])
def test_auto_on_this_cpu_follows_its_real_flags(compiled):
    flags = cpu_flags()  # this machine's /proc/cpuinfo, read as the training run reads it
    expected, why = choose_precision("cpu", flags, False, compiled)
    assert trainer_precision({"precision": "auto", "accelerator": "cpu"}, compiled) == (
        expected, "trainer.precision=auto on cpu: " + why
    )  # fmt: skip
    native = bool(flags & {"amx_bf16", "avx512_bf16"})
    assert expected == (BF16 if native and compiled else FP32)
    if not torch.cuda.is_available():
        assert trainer_precision({"precision": "auto", "accelerator": "auto"}, compiled)[0] == expected


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
    train(compose_train("debug=fdr"), tmp_path)  # no precision override: `auto`, uncompiled
    expected, why = trainer_precision({"precision": "auto", "accelerator": "auto"}, compiled=False)
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


def test_a_resumed_run_and_a_retested_checkpoint_keep_the_precision_the_run_trained_in(
    compose_train, tmp_path, caplog
):
    """`auto` would pick fp32 for these uncompiled runs; the run trained in bf16-mixed, so its
    resumed epochs and its figures tested again stay in bf16-mixed (and say why)."""
    caplog.set_level(logging.INFO, logger="mnistlab")
    train(compose_train("debug=limit", "trainer.precision=bf16-mixed"), tmp_path)
    assert trainer_precision({"precision": "auto", "accelerator": "cpu"}, compiled=False)[0] == FP32
    resumed = train(compose_train("debug=limit", "trainer.max_epochs=3", "ckpt_path=last"), tmp_path)
    assert resumed["status"] == "ok" and resumed["epochs"] == 3
    record = json.loads((tmp_path / "metrics.json").read_text())
    why = "trainer.precision=auto: the run trained in bf16-mixed"
    assert (record["precision"], record["precision_why"]) == (BF16, why)
    caplog.clear()
    evaluate(compose_train(f"ckpt_path={tmp_path / record['checkpoint']}", config_name="eval"))
    assert f"precision: bf16-mixed ({why})" in caplog.text
    evaluate(compose_train(f"ckpt_path={tmp_path / record['checkpoint']}", "trainer.precision=32-true",
                           config_name="eval"))  # fmt: skip
    assert "precision: 32-true (trainer.precision=32-true was given)" in caplog.text
