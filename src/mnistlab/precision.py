"""`trainer.precision=auto`: bf16-mixed where the hardware computes bf16 natively and fast and the
recipes' accuracy in bf16 is known to match fp32, fp32 elsewhere, and a sentence saying why, for
the console and `metrics.json`.

AMX Xeons train the default network about 1.8x faster in bf16 autocast (`make bench`), but the
recipes' seeds in bf16 have not been compared with their fp32 figures yet, so `auto` keeps fp32
there and says so; `trainer.precision=bf16-mixed` opts in.
"""

from __future__ import annotations

from pathlib import Path

import torch

BF16, FP32 = "bf16-mixed", "32-true"


def choose_precision(device_type: str, cpu_flags: set[str], cuda_bf16: bool) -> tuple[str, str]:
    """The precision for these facts and why: (Lightning precision, reason).

    - cuda: bf16-mixed when the GPU supports bf16 (Ampere and later), else fp32;
    - cpu: fp32. With AMX tiles (`amx_bf16`) bf16 is faster, but its accuracy parity with the
      fp32 recipes is not measured. AVX-512-BF16 alone (AMD Zen 4) has bf16 dot products but no
      matrix unit: there bf16 autocast measured 1.4-1.6x faster compiled but 2-2.7x slower
      eager at 2 threads for gap_cnn. AVX2 only emulates bf16;
    - anything else (mps, ...): fp32.
    """
    if device_type == "cuda":
        if cuda_bf16:
            return BF16, "the GPU computes bf16 natively"
        return FP32, "the GPU has no native bf16"
    if device_type == "cpu":
        if "amx_bf16" in cpu_flags:
            return FP32, (
                "the CPU has AMX bf16 units, but the recipes' accuracy in bf16 is not yet measured "
                "against fp32; trainer.precision=bf16-mixed opts in"
            )
        if "avx512_bf16" in cpu_flags:
            return FP32, "the CPU has AVX-512-BF16 but no AMX, where bf16 is not reliably faster"
        return FP32, "the CPU has no native bf16 (no AMX, no AVX-512-BF16)"
    return FP32, f"bf16 is not chosen automatically on {device_type}"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The CPU's feature flags as the kernel reports them (empty where there is no /proc/cpuinfo)."""
    if not cpuinfo.is_file():
        return set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def device_type(accelerator: str) -> str:
    """The device kind a Trainer with `accelerator` trains on (Lightning's `auto`: cuda, mps, cpu)."""
    accelerator = str(accelerator)
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    if accelerator == "auto" and torch.backends.mps.is_available():
        return "mps"
    return "cpu" if accelerator == "auto" else accelerator


def trainer_precision(trainer_cfg) -> tuple[str, str]:
    """The precision a Trainer config asks for, `auto` resolved on this machine, and why."""
    requested = trainer_cfg.get("precision")
    if requested is None:
        return FP32, "Lightning's default"
    if str(requested) != "auto":
        return str(requested), f"trainer.precision={requested} was given"
    kind = device_type(trainer_cfg.get("accelerator", "auto"))
    # without a GPU, a gpu accelerator fails in the Trainer, which names the fix
    cuda_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    precision, why = choose_precision(kind, cpu_flags() if kind == "cpu" else set(), cuda_bf16)
    return precision, f"trainer.precision=auto on {kind}: {why}"
