"""The network builder and the original project's final network, layer by layer."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from conftest import CONF
from mnistlab import MnistlabError
from mnistlab.models import build_net, count_params
from mnistlab.summary import layer_table, print_summary

# The original parameter table (docs/original-experiments.md): (type, output shape, params) of every layer.
ORIGINAL_TABLE = [
    ("Conv2d", [14, 28, 28], 140),
    ("BatchNorm2d", [14, 28, 28], 28),
    ("Conv2d", [14, 28, 28], 1778),
    ("BatchNorm2d", [14, 28, 28], 28),
    ("Conv2d", [14, 28, 28], 1778),
    ("BatchNorm2d", [14, 28, 28], 28),
    ("Dropout", [14, 14, 14], 0),
    ("Conv2d", [24, 14, 14], 3048),
    ("BatchNorm2d", [24, 14, 14], 48),
    ("Conv2d", [24, 14, 14], 5208),
    ("BatchNorm2d", [24, 14, 14], 48),
    ("Dropout", [24, 7, 7], 0),
    ("Conv2d", [16, 7, 7], 3472),
    ("BatchNorm2d", [16, 7, 7], 32),
    ("Conv2d", [16, 7, 7], 2320),
    ("BatchNorm2d", [16, 7, 7], 32),
    ("Dropout", [16], 0),
    ("Linear", [50], 850),
    ("Linear", [10], 510),
]


@pytest.fixture
def gap_cnn() -> nn.Sequential:
    return instantiate(OmegaConf.load(CONF / "model" / "gap_cnn.yaml"))


def test_gap_cnn_matches_the_original_table_layer_by_layer(gap_cnn):
    listed = {
        "Conv2d",
        "BatchNorm2d",
        "Dropout",
        "Linear",
    }  # the original table omits ReLU and pooling
    rows = [(r.type, r.shape[1:], r.params) for r in layer_table(gap_cnn) if r.type in listed]
    assert rows == ORIGINAL_TABLE
    assert count_params(gap_cnn) == 19_348


def test_gap_cnn_returns_logits_and_uses_the_configured_dropout(gap_cnn):
    assert gap_cnn(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(gap_cnn[-1], nn.Linear)  # no softmax: cross-entropy takes logits
    rates = {m.p for m in gap_cnn.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.1}


def test_receptive_field_is_computed_from_the_layers(gap_cnn):
    rf = [r.receptive_field for r in layer_table(gap_cnn) if r.type in ("Conv2d", "MaxPool2d")]
    assert rf == [3, 5, 7, 8, 12, 16, 18, 26, 34]
    assert layer_table(gap_cnn)[-1].receptive_field == 58  # the GAP sees all 7x7 positions


def test_conv_options_set_kernel_and_padding():
    net = build_net(["conv 1 4 k=5 p=0", "flatten"], batch_norm=False)
    assert net(torch.zeros(1, 1, 28, 28)).shape == (1, 4 * 24 * 24)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net)


@pytest.mark.parametrize("line", ["conv 1", "conv 1 8 s=2", "attention 8", "maxpool 3"])
def test_a_bad_layer_line_is_one_clear_error(line):
    with pytest.raises(MnistlabError, match="write one of: conv IN OUT"):
        build_net([line])


@pytest.mark.parametrize(("args", "total"), [([], "19,348"), (["experiment=ex09"], "22,410")])
def test_summary_ends_with_the_total(compose_train, capsys, args, total):
    print_summary(compose_train(*args, config_name="summary").model)
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"Total params: {total}"


def test_sepconv_is_a_per_channel_conv_then_a_1x1_mix_without_biases_before_batch_norm():
    net = build_net(["conv 1 8", "sepconv 8 16", "sepconv 16 4 k=5 p=2"])[3:]
    depthwise, pointwise, norm = net[0], net[1], net[2]
    assert (depthwise.groups, depthwise.kernel_size, depthwise.bias) == (8, (3, 3), None)
    assert (pointwise.kernel_size, pointwise.out_channels, pointwise.bias) == ((1, 1), 16, None)
    assert isinstance(norm, nn.BatchNorm2d) and isinstance(net[3], nn.ReLU)
    assert count_params(net) == (8 * 9 + 8 * 16 + 2 * 16) + (16 * 25 + 16 * 4 + 2 * 4)
    assert net(torch.randn(2, 8, 28, 28)).shape == (2, 4, 28, 28)
    plain = build_net(["conv 1 8", "sepconv 8 16"], batch_norm=False)[
        2:
    ]  # no BatchNorm: the mix keeps a bias
    assert plain[1].bias is not None and count_params(plain) == 8 * 9 + 8 * 16 + 16


def test_conv_groups_split_the_channels_and_must_divide_them():
    grouped = build_net(["conv 1 8", "conv 8 16 g=4"])[3:]
    assert grouped[0].groups == 4 and grouped[0].weight.shape == (16, 2, 3, 3)
    assert count_params(grouped) == 16 * 2 * 9 + 16 + 2 * 16
    with pytest.raises(MnistlabError, match=r"'conv 8 16 g=3': g=3 must divide both 8 and 16 channels"):
        build_net(["conv 1 8", "conv 8 16 g=3"])
    with pytest.raises(MnistlabError, match=r"'sepconv 8 16 g=2': unknown options \['g'\]"):
        build_net(["conv 1 8", "sepconv 8 16 g=2"])


def test_micro_cnn_stays_under_a_thousand_parameters():
    assert count_params(instantiate(OmegaConf.load(CONF / "model" / "micro_cnn.yaml"))) <= 1_000
