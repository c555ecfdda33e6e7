"""Networks as data: a list of layer specs in `conf/model/*.yaml` becomes an `nn.Sequential`.

The seed's eleven architectures differ only in channels, kernels, padding, pooling, batch
norm, where dropout sits and the head, so one builder covers them all, and a new
architecture is a new YAML file. Spec words (one per list item):

    conv IN OUT [k=3] [p=1]   Conv2d (stride 1) -> BatchNorm2d if batch_norm -> ReLU
    maxpool                   2x2 max-pool
    dropout                   Dropout at the model's `dropout` rate
    gap                       global average pool, flattened to [N, C]
    flatten                   [N, C, H, W] -> [N, C*H*W]
    linear IN OUT             Linear
    relu                      ReLU
"""

from __future__ import annotations

from torch import nn

from mnistlab import MnistlabError


def _conv(args: list[str], batch_norm: bool) -> list[nn.Module]:
    in_ch, out_ch = int(args[0]), int(args[1])
    options = dict(opt.split("=") for opt in args[2:])
    kernel, padding = int(options.pop("k", 3)), int(options.pop("p", 1))
    if options:
        raise ValueError(f"unknown conv options {sorted(options)}")
    layers = [nn.Conv2d(in_ch, out_ch, kernel, padding=padding)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    return [*layers, nn.ReLU()]


def build_net(
    layers: list[str], dropout: float = 0.0, batch_norm: bool = True, compile: bool = False
) -> nn.Sequential:
    """Build the network that the spec lines describe (see the module docstring); returns logits.
    `compile` applies torch.compile in place, so the state_dict keeps its plain keys."""
    modules: list[nn.Module] = []
    for line in layers:
        word, *args = str(line).split()
        try:
            if word == "conv":
                modules += _conv(args, batch_norm)
            elif word == "linear":
                modules.append(nn.Linear(int(args[0]), int(args[1])))
            elif word == "maxpool" and not args:
                modules.append(nn.MaxPool2d(2))
            elif word == "dropout" and not args:
                modules.append(nn.Dropout(dropout))
            elif word == "gap" and not args:
                modules += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            elif word == "flatten" and not args:
                modules.append(nn.Flatten())
            elif word == "relu" and not args:
                modules.append(nn.ReLU())
            else:
                raise ValueError("unknown layer")
        except (ValueError, IndexError) as e:
            raise MnistlabError(
                f"model layer {line!r}: {e}; write one of: conv IN OUT [k=K] [p=P], maxpool, "
                "dropout, gap, flatten, linear IN OUT, relu"
            ) from None
    net = nn.Sequential(*modules)
    if compile:
        net.compile()
    return net


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
