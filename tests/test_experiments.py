"""Every original experiment composes to its row of docs/original-experiments.md, as it really ran."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from conftest import CONF
from mnistlab.models import count_params

# ex: (params, batch, Adam lr, StepLR step, epochs, dropout, train/val split, augmentation)
ORIGINAL_RUNS = {
    1: (12_026, 512, 0.001, 2, 20, None, (60_000, 0), "rotate_zoom"),
    2: (12_026, 512, 0.001, 2, 20, None, (60_000, 0), "rotate_zoom"),
    3: (35_946, 512, 0.001, 2, 20, None, (60_000, 0), "rotate_zoom"),
    4: (32_090, 512, 0.001, 2, 20, None, (60_000, 0), "rotate_zoom"),
    5: (38_330, 512, 0.001, 2, 20, None, (60_000, 0), "rotate_zoom"),
    6: (22_186, 512, 0.001, 2, 20, None, (60_000, 0), "rotate_zoom"),
    7: (22_186, 512, 0.001, 5, 20, None, (60_000, 0), "rotate_zoom"),
    8: (22_186, 512, 0.001, 10, 20, None, (60_000, 0), "rotate_zoom"),
    9: (22_410, 512, 0.001, 10, 20, None, (60_000, 0), "rotate_zoom"),
    10: (22_410, 1024, 0.001, 10, 20, None, (60_000, 0), "rotate_zoom"),
    11: (19_614, 1024, 0.001, 10, 20, None, (60_000, 0), "rotate_zoom"),
    12: (19_614, 1024, 0.001, 10, 15, None, (50_000, 10_000), "rotate_zoom"),
    13: (19_614, 1024, 0.001, 10, 15, 0.5, (50_000, 10_000), "rotate_zoom"),
    14: (19_614, 1024, 0.001, 10, 20, 0.25, (50_000, 10_000), "none"),
    15: (19_614, 1024, 0.001, 10, 20, None, (50_000, 10_000), "none"),
    16: (19_614, 1024, 0.001, 10, 20, 0.3, (50_000, 10_000), "none"),
    17: (19_348, 1024, 0.05, 10, 20, 0.1, (50_000, 10_000), "none"),
    18: (19_348, 1024, 0.05, 10, 20, 0.15, (50_000, 10_000), "none"),
}


@pytest.mark.parametrize("ex", ORIGINAL_RUNS)
def test_experiment_config_reproduces_its_original_run(ex):
    params, batch, lr, step, epochs, dropout, split, augment = ORIGINAL_RUNS[ex]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment=ex{ex:02d}"])
    net = instantiate(cfg.model)
    dropouts = {m.p for m in net.modules() if type(m).__name__ == "Dropout"}
    assert count_params(net) == params
    assert dropouts == (set() if dropout is None else {dropout})
    assert cfg.optimizer._target_ == "torch.optim.Adam" and cfg.optimizer.lr == lr
    assert cfg.scheduler._target_.endswith("StepLR") and cfg.scheduler.step_size == step
    assert cfg.scheduler.gamma == 0.1
    assert (cfg.data.batch_size, cfg.trainer.max_epochs, cfg.data.augment) == (batch, epochs, augment)
    assert (cfg.data.train_size, cfg.data.val_size) == split
    # as the notebooks ran: plain cross-entropy, no weight averaging (the default recipe has both)
    assert cfg.label_smoothing == 0.0 and "ema" not in cfg.callbacks


def test_multi_gpu_and_slurm_configs_compose():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["trainer=ddp", "hydra/launcher=submitit_slurm"], return_hydra_config=True
        )
    assert (cfg.trainer.strategy, cfg.trainer.accelerator, cfg.trainer.sync_batchnorm) == ("ddp", "gpu", True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


# preset: (params at most, epochs at most, what else it must keep)
PRESETS = {"best": (19_348, 15), "fast": (19_348, 5), "tiny": (8_000, 30), "robust": (19_348, 15)}


@pytest.mark.parametrize("preset", PRESETS)
def test_recipe_presets_keep_their_promises(preset):
    """best and fast train the original gap_cnn unchanged on the 50k/10k split; tiny stays under
    8,000 parameters and, its recipe and epochs fixed on that split, trains on all 60k (no
    validation set: nothing is chosen during its runs, on the test set or otherwise)."""
    max_params, max_epochs = PRESETS[preset]
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={preset}"])
        gap_cnn = compose("train").model
    net = instantiate(cfg.model)
    assert count_params(net) <= max_params and cfg.trainer.max_epochs <= max_epochs
    if preset != "tiny":
        assert cfg.model.layers == gap_cnn.layers
    split = (60_000, 0) if preset == "tiny" else (50_000, 10_000)
    assert (cfg.data.train_size, cfg.data.val_size) == split


def test_the_default_recipe_is_robust_the_released_weights_recipe():
    """`python train.py` trains what weights/gap_cnn.* came from; `experiment=best` is that
    recipe without the stress-set distortion."""
    with initialize_config_dir(str(CONF), version_base="1.3"):
        default = compose("train")
        robust, best = (compose("train", overrides=[f"experiment={p}"]) for p in ("robust", "best"))
    assert default == robust and default.data.augment == "half_distort"
    best.data.augment = "half_distort"
    assert best == robust
