"""A per-layer table of a network: output shape, parameters and receptive field.

The receptive field is computed from the layers (kernel, stride, padding of each conv and
pool), not typed in, so it stays right when a YAML file changes the architecture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnistlab import instantiate


@dataclass
class Row:
    index: int
    type: str
    shape: list[int]
    params: int
    receptive_field: int


def _pair(value) -> int:
    return value[0] if isinstance(value, tuple) else value


def layer_table(net: nn.Sequential, image_size: int = 28) -> list[Row]:
    """One row per layer, from one forward pass of a dummy image through `net`."""
    rows, rf, jump = [], 1, 1  # receptive field and input pixels between adjacent outputs
    x = torch.zeros(1, 1, image_size, image_size)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for i, layer in enumerate(net, start=1):
            in_size = x.shape[-1]
            x = layer(x)
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
                dilation = _pair(getattr(layer, "dilation", 1))
                rf += (dilation * (kernel - 1)) * jump
                jump *= stride
            elif isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                rf += (in_size - 1) * jump  # a kernel as large as its input
            params = sum(p.numel() for p in layer.parameters())
            rows.append(Row(i, type(layer).__name__, [-1, *x.shape[1:]], params, rf))
    net.train(was_training)
    return rows


def format_table(net: nn.Sequential) -> str:
    rows = layer_table(net)
    header = f"{'Layer':>5}  {'Type':<20}{'Output shape':<20}{'Params':>8}{'RF':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row.index:>5}  {row.type:<20}{str(row.shape):<20}{row.params:>8,}{row.receptive_field:>6}"
        )
    lines += ["-" * len(header), f"Total params: {sum(r.params for r in rows):,}"]
    return "\n".join(lines)


def print_summary(model_cfg) -> None:
    print(format_table(instantiate(model_cfg)))
