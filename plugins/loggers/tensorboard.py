"""TensorBoard logger: ``loggers: [{name: jsonl}, {name: tensorboard}]``; then ``tensorboard --logdir RUN_DIR``.

Every numeric field of a log record with a step becomes a scalar named
``stage/event/field`` (``vis_tok/train/loss``, ``vis_tok/collapse/clip``);
the evaluation's aggregates go under ``eval/``. Needs the ``tensorboard``
package (``pip install -e ".[tensorboard]"``).
"""
import os

from core import ConfigError, hookimpl

SKIP = {"step", "time"}


class TensorBoardLogger:
    def __init__(self, run_dir, subdir="tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ConfigError('needs the tensorboard package: pip install -e ".[tensorboard]"') from e
        self.writer = SummaryWriter(os.path.join(run_dir, subdir))

    @hookimpl
    def vlmkit_log(self, record):
        event = record.get("event")
        prefix = "eval" if event == "eval" else f"{record.get('stage')}/{event}"
        step = record.get("step", 0)
        for key, value in record.items():
            if key not in SKIP and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        if event in ("stage_end", "eval", "checkpoint"):
            self.writer.flush()


@hookimpl
def vlmkit_register(registry):
    registry.add("logger", "tensorboard", TensorBoardLogger)
