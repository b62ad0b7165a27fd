"""DeepSpeed ZeRO stage 2 (plugin ``zero2``): gradients and optimizer state partitioned across processes.

    lmflow run --nproc 4 --plugins zero2 --zero2-offload-optimizer ...

The DeepSpeed config is built from the run's own options (see :mod:`lmflow_plugins.deepspeed_config`) and
handed to the Trainer, which runs the DeepSpeed engine.
"""

from __future__ import annotations

from . import deepspeed_config

NAME = "zero2"
STAGE = 2

declare_options, declare_conflicts, validate_config, adjust_training_args = deepspeed_config.hooks(
    NAME, STAGE
)
