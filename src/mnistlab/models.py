"""Networks as data: a list of layer specs in `conf/model/*.yaml` becomes an `nn.Sequential`.

The original project's eleven architectures differ only in channels, kernels, padding,
pooling, batch norm, where dropout sits and the head, so one builder covers them all, and a
new architecture is a new YAML file. Spec words (one per list item):

    conv IN OUT [k=3] [p=1] [g=1]
                              Conv2d (stride 1, g groups) -> BatchNorm2d if batch_norm -> ReLU
    sepconv IN OUT [k=3] [p=1]
                              depthwise-separable: a KxK conv per channel, then a 1x1 conv
                              mixing channels (no biases before BatchNorm) -> BatchNorm2d -> ReLU;
                              IN*(K*K + OUT) weights instead of IN*OUT*K*K, the lever of networks
                              under a thousand parameters
    maxpool                   2x2 max-pool
    dropout                   Dropout at the model's `dropout` rate
    gap                       global average pool, flattened to [N, C]
    flatten                   [N, C, H, W] -> [N, C*H*W]
    linear IN OUT             Linear
    relu                      ReLU
"""

from __future__ import annotations

import torch
from torch import nn

from mnistlab import MnistlabError, as_number

WORDS = (
    "conv IN OUT [k=K] [p=P] [g=G], sepconv IN OUT [k=K] [p=P], maxpool, dropout, gap, flatten, "
    "linear IN OUT, relu"
)


def _conv(args: list[str], batch_norm: bool, separable: bool) -> list[nn.Module]:
    in_ch, out_ch = int(args[0]), int(args[1])
    options = dict(opt.split("=") for opt in args[2:])
    kernel, padding = int(options.pop("k", 3)), int(options.pop("p", 1))
    groups = 1 if separable else int(options.pop("g", 1))
    if options:
        raise ValueError(f"unknown options {sorted(options)}")
    if in_ch % groups or out_ch % groups:
        raise ValueError(f"g={groups} must divide both {in_ch} and {out_ch} channels")
    if separable:  # BatchNorm follows, so a bias would be a wasted parameter; without it, keep one
        layers = [
            nn.Conv2d(in_ch, in_ch, kernel, padding=padding, groups=in_ch, bias=False),
            nn.Conv2d(in_ch, out_ch, 1, bias=not batch_norm),
        ]
    else:
        layers = [nn.Conv2d(in_ch, out_ch, kernel, padding=padding, groups=groups)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    return [*layers, nn.ReLU()]


def _layer(word: str, args: list[str], dropout: float, batch_norm: bool) -> list[nn.Module]:
    if word in ("conv", "sepconv"):
        return _conv(args, batch_norm, separable=word == "sepconv")
    if word == "linear" and len(args) == 2:
        return [nn.Linear(int(args[0]), int(args[1]))]
    simple = {
        "maxpool": lambda: [nn.MaxPool2d(2)],
        "dropout": lambda: [nn.Dropout(dropout)],
        "gap": lambda: [nn.AdaptiveAvgPool2d(1), nn.Flatten()],
        "flatten": lambda: [nn.Flatten()],
        "relu": lambda: [nn.ReLU()],
    }
    if word in simple and not args:
        return simple[word]()
    raise ValueError("unknown layer")


def build_net(layers: list[str], dropout: float = 0.0, batch_norm: bool = True) -> nn.Sequential:
    """The network the spec lines describe (see the module docstring), returning logits.

    A dummy batch goes through each layer as it is built, so a shape mismatch names its line
    here instead of failing at the first training batch."""
    if not 0 <= as_number(dropout) < 1:
        raise MnistlabError(f"model.dropout={dropout!r} is not allowed; use a value in [0, 1)")
    modules: list[nn.Module] = []
    x = torch.zeros(2, 1, 28, 28)
    for line in layers:
        word, *args = str(line).split()
        try:
            new = _layer(word, args, dropout, batch_norm)
        except (ValueError, IndexError) as e:
            raise MnistlabError(f"model layer {line!r}: {e}; write one of: {WORDS}") from None
        try:
            with torch.no_grad():
                for module in new:
                    x = module.eval()(x)
        except RuntimeError as e:
            raise MnistlabError(
                f"model layer {line!r} does not fit its input {list(x.shape[1:])} "
                f"({str(e).splitlines()[0][:120]}); fix the channels or sizes in model.layers"
            ) from None
        modules += new
    return nn.Sequential(*modules).train()


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def shape_layers(
    widths: list[int], convs: list[int], conv: str = "conv", transition: bool = False
) -> list[str]:
    """The layers of one gap_cnn-like shape, for architecture search: three stages at 28, 14 and 7
    pixels with `widths[i]` channels and `convs[i]` 3x3 convs each (`conv` or `sepconv` after the
    first layer), max-pool and dropout between stages, an optional 1x1 transition opening stages
    2 and 3 (`conv IN OUT k=1 p=0`), then global average pool and one linear layer."""
    layers, channels = [f"conv 1 {widths[0]}"], widths[0]
    for stage, (width, count) in enumerate(zip(widths, convs, strict=True)):
        if stage:
            layers += ["maxpool", "dropout"]
            if transition:
                layers.append(f"conv {channels} {width} k=1 p=0")
                channels = width
        for _ in range(count - (stage == 0)):
            layers.append(f"{conv} {channels} {width}")
            channels = width
    return [*layers, "gap", f"linear {channels} 10"]
