"""What happens around an epoch rather than inside it: metric logging (``metrics.csv``, TensorBoard, the log line)
and early stopping, in the spirit of MONAI's engine handlers."""

from __future__ import annotations

import logging
from pathlib import Path

from liverus.training.run_folder import RunFolder
from liverus.training.state import TrainState

__all__ = ["MetricsLogger", "EarlyStopping"]

log = logging.getLogger("liverus.training")


class MetricsLogger:
    """Writes each epoch's row to ``metrics.csv`` and TensorBoard (rank 0 only) and logs one line.

    Args:
        folder: the run folder.
        epochs: the planned number of epochs (for the log line).
        tensorboard: also write ``tb/`` event files.
        start_epoch: the first epoch of this process (a resumed run purges later TensorBoard events).
    """

    def __init__(self, folder: RunFolder, epochs: int, *, tensorboard: bool, start_epoch: int = 0) -> None:
        self.folder, self.epochs = folder, epochs
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(folder.path) / "tb"), purge_step=start_epoch)

    def epoch_end(self, row: dict, improved: bool, has_val: bool) -> None:
        self.folder.append_metrics(row)
        if self.writer is not None:
            for k, v in row.items():
                if k != "epoch":
                    self.writer.add_scalar(k, v, row["epoch"])
            self.writer.flush()
        val = f"  val_loss {row['val_loss']:.4f}  val_auc {row['val_auc']:.4f}" if has_val else "  (no validation)"
        aux = ""
        if "attention_loss" in row:
            aux += f"  attention_loss {row['attention_loss']:.4f}"
        if "segmentation_loss" in row:
            aux += f"  segmentation_loss {row['segmentation_loss']:.4f}"
        if "debias_group_accuracy" in row:
            aux += f"  group_acc {row['debias_group_accuracy']:.3f} (chance {row['debias_group_chance']:.3f})"
        log.info(
            "epoch %d/%d  loss %.4f%s%s  %.1f img/s%s",
            row["epoch"],
            self.epochs,
            row["train_loss"],
            val,
            aux,
            row["train_images_per_s"],
            "  *best*" if improved and has_val else "",
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class EarlyStopping:
    """Stop when the selection score has not improved for ``patience`` epochs (0 disables)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def should_stop(self, state: TrainState) -> bool:
        stop = bool(self.patience) and state.bad_epochs >= self.patience
        if stop:
            log.info("early stopping: no validation AUC gain for %d epochs", state.bad_epochs)
        return stop
