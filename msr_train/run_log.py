"""Where a run's numbers go: TensorBoard events, metrics.jsonl and summary.json.

TensorBoard's x-axis is the number of training examples seen, so runs at different
batch sizes line up on one chart. Hyperparameters are written into the run's own event
file (not through ``SummaryWriter.add_hparams``, which makes a spurious sub-run), so the
HParams tab shows one row per run; its metric columns are the last values of
``HPARAM_METRICS``: the best validation accuracy, the test accuracy of the model selected
on it, and the final model's test accuracy. The Custom Scalars tab
overlays every run on one chart per metric (``COMPARE_CHARTS``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from omegaconf import OmegaConf

from .checkpoint import atomic_write, write_json

#: metrics.jsonl key -> TensorBoard tag. Other keys (step, epoch, ...) stay in the jsonl.
#: The training loss and the lr are logged at every log point instead (``trainer.log_every``).
TB_TAGS = {
    "train_acc": "train/acc",
    "val_loss": "val/loss", "val_acc": "val/acc", "val_top5": "val/top5", "best_val_acc": "val/best_acc",
    "test_loss": "test/loss", "test_acc": "test/acc", "test_top5": "test/top5",
    "img_per_s": "throughput/img_per_s",
}
#: Scalars the HParams tab shows next to each run's choices; it shows a tag's last value,
#: so test/acc is the final model's test accuracy, test/selected_acc the val-selected one's.
HPARAM_METRICS = ("val/best_acc", "test/selected_acc", "test/acc")
#: Tags that get one Custom Scalars chart each.
COMPARE_CHARTS = ("val/acc", "val/loss", "train/loss", "train/acc", "test/acc", "lr", "throughput/img_per_s")


def custom_scalars_layout() -> dict:
    """One chart per tag of ``COMPARE_CHARTS``. Charts select tags by regex and draw every
    run that has a matching tag, and TensorBoard merges the identical layouts that all
    runs write, so each chart overlays all runs."""
    return {"compare runs": {tag: ["Multiline", [f"^{re.escape(tag)}$"]] for tag in COMPARE_CHARTS}}


def append_jsonl(path: Path, records: list[dict]) -> None:
    """Append one JSON line per record and force it to disk, so that a reader (or a crash)
    sees whole records only; a torn last line can only come from a kill mid-write."""
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


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


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON-lines file; a torn last line (a kill mid-write) is ignored."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def truncate_jsonl(path: Path, keep) -> list[dict]:
    """Rewrite ``path`` (atomically) with only the records for which ``keep(record)`` is
    true, and return them: what a resumed run keeps of the run that died."""
    records = [r for r in read_jsonl(path) if keep(r)] if Path(path).exists() else []
    atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))
    return records


class RunLog:
    """``resume_step``: the step of the checkpoint a resumed run continues from. Records
    logged after it (by the run that died) are dropped from metrics.jsonl and purged from
    TensorBoard, so the resumed run writes each point exactly once."""

    def __init__(self, out_dir: Path, cfg, *, tensorboard: bool = True, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.records = truncate_jsonl(self.metrics_path, lambda r: resume_step is not None and r["step"] <= resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
            # Purge what a dead earlier run left beyond the resume point (all of it when starting afresh).
            purge = 0 if resume_step is None else resume_step * cfg.batch_size + 1
            self.writer = SummaryWriter(str(self.out_dir), purge_step=purge)
            exp, ssi, self._sei = hparams(flat_hparams(cfg), {m: 0.0 for m in HPARAM_METRICS})
            if resume_step is None:
                self.writer.file_writer.add_summary(exp)
                self.writer.file_writer.add_summary(ssi)
                self.writer.add_custom_scalars(custom_scalars_layout())

    def log(self, record: dict) -> None:
        """One evaluation: appended to metrics.jsonl (flushed to disk) and TensorBoard."""
        self.records.append(record)
        append_jsonl(self.metrics_path, [record])
        if self.writer is not None:
            step = record["examples_seen"]
            for key, tag in TB_TAGS.items():
                if key in record:
                    self.writer.add_scalar(tag, record[key], step)
            self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Extra TensorBoard scalars (e.g. per-layer mean shift); step in examples seen."""
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def close(self, summary: dict) -> None:
        write_json(self.out_dir / "summary.json", summary)
        if self.writer is not None:
            self.writer.file_writer.add_summary(self._sei)
            self.writer.close()
