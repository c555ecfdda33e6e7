"""A page to draw a digit on: `python demo.py [port=7860] [host=127.0.0.1] [ckpt_path=...]`."""

import hydra

from mnistlab.cli import launch, one_line_errors
from mnistlab.demo import serve


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
@one_line_errors
def main(cfg):
    serve(cfg)


if __name__ == "__main__":
    launch(main)
