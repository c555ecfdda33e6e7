"""A per-layer table of any network: output shape, parameters and receptive field.

Rows come from forward hooks on the leaf modules during one pass of a dummy batch, so any
`nn.Module` works, not only the layer-list networks. The receptive field is computed from the
layers (kernel, stride, dilation of each conv and pool) while the layers form one chain, each
taking the previous one's output; from the first layer that does not (a residual sum, a
branch), it is shown as `?`: unknown, never wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mnistlab import instantiate

# Layers that keep every output pixel's receptive field as it was.
POINTWISE = (
    nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh,
    nn.Hardswish, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten, nn.Linear, nn.GroupNorm,
    nn.LayerNorm, nn.Softmax, nn.LogSoftmax,
)  # fmt: skip


@dataclass
class Row:
    index: int
    name: str
    type: str
    shape: list[int]
    params: int
    receptive_field: int | None  # None: unknown


def _pair(value) -> int:
    return value[0] if isinstance(value, tuple) else value


def layer_table(net: nn.Module, input_shape: list[int] = (1, 28, 28)) -> list[Row]:
    """One row per call of a leaf layer, from one forward pass of a dummy image through `net`."""
    calls: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor]] = []
    leaves = [(name, m) for name, m in net.named_modules() if not list(m.children())] or [("", net)]
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: calls.append((name, m, args, out)))
        for name, module in leaves
    ]
    was_training, previous = net.training, torch.zeros(1, *input_shape)
    try:
        with torch.no_grad():
            net.eval()(previous)
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()

    rows, rf, jump, counted = [], 1, 1, set()
    for i, (name, layer, args, out) in enumerate(calls, start=1):
        x = args[0] if args else None
        if x is not previous:  # the input is not the last layer's output: a sum, a branch, a reshape
            rf = None
        if rf is not None:
            if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
                kernel, stride = _pair(layer.kernel_size), _pair(layer.stride)
                rf += _pair(getattr(layer, "dilation", 1)) * (kernel - 1) * jump
                jump *= stride
            elif isinstance(layer, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                rf += (x.shape[-1] - 1) * jump  # a kernel as large as its input
            elif not isinstance(layer, POINTWISE):
                rf = None  # a layer whose reach is not known here
        previous = out if isinstance(out, torch.Tensor) else None
        params = 0 if id(layer) in counted else sum(p.numel() for p in layer.parameters())
        counted.add(id(layer))
        shape = [-1, *out.shape[1:]] if isinstance(out, torch.Tensor) else [type(out).__name__]
        rows.append(Row(i, name, type(layer).__name__, shape, params, rf))
    return rows


def format_table(net: nn.Module, input_shape: list[int] = (1, 28, 28)) -> str:
    rows = layer_table(net, input_shape)
    header = f"{'Layer':>5}  {'Name':<18}{'Type':<20}{'Output shape':<20}{'Params':>8}{'RF':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        rf = "?" if row.receptive_field is None else str(row.receptive_field)
        lines.append(
            f"{row.index:>5}  {row.name[:17]:<18}{row.type[:19]:<20}"
            f"{str(row.shape):<20}{row.params:>8,}{rf:>6}"
        )
    total = sum(p.numel() for p in net.parameters())
    outside = total - sum(r.params for r in rows)
    if outside:  # parameters a module uses directly rather than through a leaf layer
        lines.append(f"{'':>5}  {'(not in a layer)':<78}{outside:>8,}")
    lines += ["-" * len(header), f"Total params: {total:,}"]
    if any(r.receptive_field is None for r in rows):
        lines.append(
            "RF ?: the layers do not form one chain from there (a sum or a branch), so it is not computed"
        )
    return "\n".join(lines)


def print_summary(model_cfg, data_cfg=None) -> None:
    """The table for the data's image shape where its files are there, else MNIST's 28x28."""
    input_shape = [1, 28, 28]
    if data_cfg is not None:
        datamodule = instantiate(data_cfg)
        if (datamodule.data_dir / datamodule.files["train_images"]).is_file():
            input_shape = datamodule.input_shape
    print(format_table(instantiate(model_cfg), input_shape))
