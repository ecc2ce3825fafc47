"""Where a run's numbers go: TensorBoard events, metrics.jsonl and summary.json.

TensorBoard's x-axis is the number of training examples seen, so runs at different
batch sizes line up on one chart. Hyperparameters are written into the run's own event
file (not through ``SummaryWriter.add_hparams``, which makes a spurious sub-run), so the
HParams tab shows one row per run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import write_json

#: metrics.jsonl key -> TensorBoard tag. Other keys (step, epoch, ...) stay in the jsonl.
TB_TAGS = {
    "train_loss": "train/loss", "train_acc": "train/acc",
    "test_loss": "test/loss", "test_acc": "test/acc", "test_top5": "test/top5",
    "best_test_acc": "test/best_acc", "lr": "lr", "img_per_s": "throughput/img_per_s",
}
#: Scalars the HParams tab shows next to each run's choices.
HPARAM_METRICS = ("test/acc", "test/best_acc")


def flat_hparams(cfg) -> dict:
    """Scalar config values as 'group.key' -> value, the types TensorBoard accepts."""
    out = {}

    def walk(prefix, node):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v)
            elif isinstance(v, (bool, int, float, str)):
                out[key] = v
            elif v is None:
                out[key] = "null"
            else:
                out[key] = str(v)
    walk("", OmegaConf.to_container(cfg, resolve=True))
    return out


class RunLog:
    def __init__(self, out_dir: Path, cfg, *, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            self.writer = SummaryWriter(str(self.out_dir))
            exp, ssi, self._sei = hparams(flat_hparams(cfg), {m: 0.0 for m in HPARAM_METRICS})
            self.writer.file_writer.add_summary(exp)
            self.writer.file_writer.add_summary(ssi)

    def log(self, record: dict) -> None:
        """One evaluation: appended to metrics.jsonl (flushed to disk) and TensorBoard."""
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.writer is not None:
            step = record["examples_seen"]
            for key, tag in TB_TAGS.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], step)
            self.writer.flush()

    def close(self, summary: dict) -> None:
        write_json(self.out_dir / "summary.json", summary)
        if self.writer is not None:
            self.writer.file_writer.add_summary(self._sei)
            self.writer.close()
