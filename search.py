"""An Optuna study over a search space: `python search.py hparams_search=dropout_lr n_trials=20`."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.search import search


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
@one_line_errors
def main(cfg):
    search(cfg)


if __name__ == "__main__":
    launch(main)
