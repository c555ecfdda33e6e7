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
