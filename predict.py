"""The digit in an image: `python predict.py image=digit.png [ckpt_path=...]`."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.predict import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
@one_line_errors
def main(cfg):
    predict(cfg)


if __name__ == "__main__":
    launch(main)
