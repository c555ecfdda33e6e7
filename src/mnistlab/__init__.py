"""mnistlab: small-CNN experiments on MNIST with Lightning and Hydra."""

import inspect
import sys
from pathlib import Path

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # src/mnistlab/__init__.py -> the checkout
if str(PROJECT_ROOT) not in sys.path:  # `extensions/`, a researcher's own code, from any folder
    sys.path.append(str(PROJECT_ROOT))


class MnistlabError(Exception):
    """Bad input from the user: the entry points print it as one line and exit non-zero."""


def as_number(value) -> float:
    """`value` if it is an int or a float (not a bool), else NaN, which fails every range check:
    a string or a bool typed on the command line is refused like an out-of-range number."""
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def as_integer(value) -> float:
    """`value` if it is an int (not a bool), else NaN."""
    return value if isinstance(value, int) and not isinstance(value, bool) else float("nan")


def instantiate(config, *args, **kwargs):
    """Hydra's `instantiate`, but a `MnistlabError` from the constructor (a value it refused)
    comes through as itself, not wrapped in Hydra's InstantiationException."""
    try:
        return hydra_instantiate(config, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, MnistlabError):
            raise e.__cause__ from None
        raise


def lightning_trainer_defaults() -> dict:
    """Every Lightning Trainer argument at Lightning's own default: the base of the `trainer`
    config group, and what a printed config leaves out."""
    from lightning import Trainer

    params = inspect.signature(Trainer.__init__).parameters
    return {name: param.default for name, param in params.items() if name != "self"}
