"""`trainer.precision=auto`: bf16-mixed where the hardware computes bf16 natively and it is
faster, fp32 elsewhere, and a sentence saying why, for the console and `metrics.json`.

The recipes' accuracy in bf16-mixed matches fp32 within the seed spread (docs/speed.md has the
seeds); `trainer.precision=32-true` gives fp32 anywhere.
"""

from __future__ import annotations

from pathlib import Path

import torch

BF16, FP32 = "bf16-mixed", "32-true"


def choose_precision(
    device_type: str, cpu_flags: set[str], cuda_bf16: bool, compiled: bool = False
) -> tuple[str, str]:
    """The precision for these facts and why: (Lightning precision, reason).

    - cuda: bf16-mixed when the GPU supports bf16 (Ampere and later), else fp32;
    - cpu with bf16 dot products (AMX tiles, or AVX-512-BF16 as on AMD Zen 4): bf16-mixed when
      the network is compiled (the default); uncompiled (`compile=false`, the debug modes) fp32,
      as there bf16 autocast gained only 5% on Zen 4 (`make bench`, row (b*)): not worth
      changing the arithmetic of the quick checks;
    - cpu without them (AVX2 only): fp32, as bf16 is emulated there, several times slower;
    - anything else (mps, ...): fp32.
    """
    if device_type == "cuda":
        if cuda_bf16:
            return BF16, "the GPU computes bf16 natively"
        return FP32, "the GPU has no native bf16"
    if device_type == "cpu":
        units = "AMX" if "amx_bf16" in cpu_flags else "AVX-512-BF16" if "avx512_bf16" in cpu_flags else None
        if units is None:
            return FP32, "the CPU has no native bf16 (no AMX, no AVX-512-BF16)"
        if not compiled:
            return FP32, (
                f"the CPU computes bf16 ({units}), but bf16 pays only for a compiled network; "
                "compile=true trains in bf16"
            )
        return BF16, f"the CPU computes bf16 natively ({units}) and the network is compiled"
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


def trainer_precision(trainer_cfg, compiled: bool = False) -> tuple[str, str]:
    """The precision a Trainer config asks for, `auto` resolved on this machine for a network
    that is (or is not) compiled, and why."""
    requested = trainer_cfg.get("precision")
    if requested is None:
        return FP32, "Lightning's default"
    if str(requested) != "auto":
        return str(requested), f"trainer.precision={requested} was given"
    kind = device_type(trainer_cfg.get("accelerator", "auto"))
    # without a GPU, a gpu accelerator fails in the Trainer, which names the fix
    cuda_bf16 = kind == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpu_flags() if kind == "cpu" else set()
    precision, why = choose_precision(kind, flags, cuda_bf16, compiled)
    return precision, f"trainer.precision=auto on {kind}: {why}"
