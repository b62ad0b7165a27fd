"""DeepSpeed ZeRO stage 3 (plugin ``zero3``): parameters, gradients and optimizer state partitioned across processes.

    lmflow run --nproc 4 --plugins zero3 --zero3-offload-optimizer --zero3-offload-params ...

The DeepSpeed config is built from the run's own options (see :mod:`lmflow_plugins.deepspeed_config`) and
handed to the Trainer, which runs the DeepSpeed engine. The model is created already partitioned (the
Trainer's arguments exist before it loads), and at the end its weights are gathered into an ordinary model
directory that ``from_pretrained`` loads.
"""

from __future__ import annotations

from . import deepspeed_config

NAME = "zero3"
STAGE = 3

declare_options, declare_conflicts, validate_config, adjust_training_args = deepspeed_config.hooks(
    NAME, STAGE
)
