"""The `tensorboard` logger: event files under `<run_dir>/tensorboard/`, every metric
(each loss term, lr, grad norm, throughput) as `train/<name>` and validation as
`val/<name>`. A resumed run purges events past its step."""
from __future__ import annotations

import mega


class TensorBoardLogger:
    def __init__(self, run):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.run_dir / "tensorboard"), purge_step=run.step + 1 if run.step else None)

    @mega.hookimpl
    def on_step_end(self, run, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    @mega.hookimpl
    def on_validation_end(self, run, step, metrics):
        for k, v in metrics.items():
            self.writer.add_scalar(f"val/{k}", v, step)
        self.writer.flush()

    @mega.hookimpl
    def on_train_end(self, run):
        self.writer.close()

    @mega.hookimpl
    def on_exception(self, run, exception):
        self.writer.close()


@mega.hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardLogger)
