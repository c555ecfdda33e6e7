"""What every entry script shares: user errors end as one line and a non-zero exit."""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import lightning as L
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from omegaconf.errors import MissingMandatoryValue

from mnistlab import MnistlabError

log = logging.getLogger("mnistlab")

# `trainer=lightning`: every Lightning Trainer argument at Lightning's own default, so that any
# `trainer.NAME=VALUE` override works as Lightning documents it (conf/trainer/*.yaml build on it).
ConfigStore.instance().store(
    group="trainer",
    name="lightning",
    node={
        name: param.default
        for name, param in inspect.signature(L.Trainer.__init__).parameters.items()
        if name != "self"
    },
)


def one_line_errors(task):
    """Print a `MnistlabError` as `error: ...` and exit 2 instead of showing a traceback.

    In a multirun the failed job is only logged (its metrics.json already says why), so the
    other jobs of the sweep still run."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            try:
                return task(cfg)
            except MissingMandatoryValue as e:
                raise MnistlabError(
                    f"{e.full_key} is required: add {e.full_key}=VALUE to the command"
                ) from None
            except InstantiationException as e:  # Hydra wraps what a config's constructor raised
                if isinstance(e.__cause__, MnistlabError):
                    raise e.__cause__ from None
                raise
        except MnistlabError as e:
            if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
                log.error("job failed: %s", e)
                return None
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    return wrapper
