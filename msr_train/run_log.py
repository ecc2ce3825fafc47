"""Where a run's numbers go: metrics.jsonl and summary.json, and the loggers of the
``logger`` config group: TensorBoard events here, MLflow through msr_train.trackers. Every
logger is fed from the same calls (a record, the log points' scalars, the summary), so
they all hold the numbers metrics.jsonl holds.

TensorBoard's x-axis is the number of training examples seen, so runs at different
batch sizes line up on one chart. Hyperparameters are written into the run's own event
file (not through ``SummaryWriter.add_hparams``, which makes a spurious sub-run), so the
HParams tab shows one row per run; its metric columns are the last values of
``HPARAM_METRICS``: the best validation accuracy, the test accuracy of the model selected
on it, and the final model's test accuracy. The Custom Scalars tab
overlays every run on one chart per metric (``COMPARE_CHARTS``).
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf

from .rules import CONFIG_GROUPS, flatten
from .run_files import METRICS, SUMMARY
from .safe_files import append_jsonl, truncate_jsonl, write_json
from .sweeps import announced_keys
from .trackers import TRACKERS

#: The splits of record keys, ``<split>_<metric>`` (the longest prefix first).
SPLITS = ("val_raw", "train", "val", "test")
#: Exceptions to tensorboard_tag's rule.
TAG_EXCEPTIONS = {"best_val_acc": "val/best_acc", "img_per_s": "throughput/img_per_s"}
#: Record keys without a chart: counters (the x-axis is examples seen), and the training
#: loss and lr, which ``RunLog.scalars`` logs at every log point instead (the record's
#: train_loss is the mean over the whole window since the last evaluation).
NOT_CHARTED = ("step", "epoch", "examples_seen", "wall_time_s", "train_loss", "lr")
#: Record keys that ``RunLog.scalars`` logs under the same name at every log point: a
#: tracker gets them from there alone, since the record's copy would be a second point at
#: the same step (and a run killed between the two would resume with one of them).
TRACKED_AS_SCALARS = ("lr",)


def tensorboard_tag(key: str) -> str | None:
    """A metrics.jsonl key's TensorBoard tag, by one rule: ``<split>_<metric>`` ->
    ``<split>/<metric>`` (val_acc -> val/acc, val_raw_loss -> val_raw/loss), a key that
    holds a '/' as it is (grad_norm/head.weight), any other key under its own name; the
    exceptions are TAG_EXCEPTIONS, and NOT_CHARTED keys get None."""
    if key in NOT_CHARTED:
        return None
    if key in TAG_EXCEPTIONS:
        return TAG_EXCEPTIONS[key]
    split = next((s for s in SPLITS if key.startswith(f"{s}_")), None)
    return key if split is None else f"{split}/{key[len(split) + 1:]}"


#: Scalars the HParams tab shows next to each run's choices; it shows a tag's last value,
#: so test/acc is the final model's test accuracy, test/selected_acc the val-selected one's.
HPARAM_METRICS = ("val/best_acc", "test/selected_acc", "test/acc")
#: Tags that get one Custom Scalars chart each.
COMPARE_CHARTS = ("val/acc", "val/loss", "train/loss", "train/acc", "test/acc", "lr", "throughput/img_per_s")


#: TensorBoard labels every x-axis "Step"; ours holds examples seen (runs at different
#: batch sizes line up), so the Custom Scalars charts say so where the user reads them.
X_AXIS_NOTE = " (x: examples seen)"


def examples_seen(step: int, batch_size: int) -> int:
    """Training examples seen after ``step`` optimizer steps (every process's, every
    micro-batch's): the x-axis of every chart and the summary's ``examples_seen``."""
    return step * batch_size


def custom_scalars_layout() -> dict:
    """One chart per tag of ``COMPARE_CHARTS``. Charts select tags by regex and draw every
    run that has a matching tag, and TensorBoard merges the identical layouts that all
    runs write, so each chart overlays all runs."""
    return {f"compare runs{X_AXIS_NOTE}": {tag + X_AXIS_NOTE: ["Multiline", [f"^{re.escape(tag)}$"]]
                                           for tag in COMPARE_CHARTS}}


def flat_hparams(cfg) -> dict:
    """Scalar config values as 'group.key' -> value, the types TensorBoard accepts."""
    return {key: hparam_value(v) for key, v in flatten(OmegaConf.to_container(cfg, resolve=True)).items()}


def hparam_value(value):
    """A config value as ``flat_hparams`` records it: scalars as they are, null as "null",
    anything else (a list) as its text."""
    if value is None:
        return "null"
    return value if isinstance(value, (bool, int, float, str)) else str(value)


#: Shown first in the HParams tab (TensorBoard puts the hparams marked as differing first,
#: each group by name), with the keys a sweep varies.
KEY_HPARAMS = ("method.name", "model.name", "dataset.name", "batch_size", "optimizer.lr", "seed")


def swept_keys() -> set[str]:
    """The config keys the current multirun varies (none outside one), as flat keys."""
    return {f"{k}.name" if k in CONFIG_GROUPS and k != "logger" else k for k in announced_keys()}


def experiment_name(cfg) -> str:
    """A tracker's experiment: the sweep dir's name in a Hydra multirun, else the dataset."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return Path(HydraConfig.get().sweep.dir).name
    return cfg.dataset.name


def _hparams_summary(tag: str, **plugin_data):
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import plugin_data_pb2
    content = plugin_data_pb2.HParamsPluginData(version=0, **plugin_data).SerializeToString()
    metadata = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name="hparams", content=content))
    return Summary(value=[Summary.Value(tag=tag, metadata=metadata)])


def hparams_summaries(cfg):
    """The HParams plugin's experiment, ``session_start_info`` and ``session_end_info`` summaries for a run:
    integers as text (TensorBoard would show batch size 128 as 128.00), booleans as
    booleans (torch's ``hparams`` writes them as 1.0), the key settings and the swept ones
    marked as differing so that TensorBoard lists them first."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
    values = {k: str(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in flat_hparams(cfg).items()}
    first = set(KEY_HPARAMS) | swept_keys()
    kinds = {bool: api_pb2.DATA_TYPE_BOOL, float: api_pb2.DATA_TYPE_FLOAT64, str: api_pb2.DATA_TYPE_STRING}
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=kinds[type(v)], differs=k in first) for k, v in values.items()],
        metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=m)) for m in HPARAM_METRICS])
    start = plugin_data_pb2.SessionStartInfo()
    for k, v in values.items():
        field = {bool: "bool_value", float: "number_value", str: "string_value"}[type(v)]
        setattr(start.hparams[k], field, v)
    end = plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS)
    return (_hparams_summary("_hparams_/experiment", experiment=experiment),
            _hparams_summary("_hparams_/session_start_info", session_start_info=start),
            _hparams_summary("_hparams_/session_end_info", session_end_info=end))


class RunLog:
    """``resume_step``: the step of the checkpoint a resumed run continues from. Records
    logged after it (by the run that died) are dropped from metrics.jsonl and purged from
    TensorBoard, so the resumed run writes each point exactly once."""

    def __init__(self, out_dir: Path, cfg, *, resume_step: int | None = None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = cfg.batch_size
        self.metrics_path = self.out_dir / METRICS
        self.records = truncate_jsonl(self.metrics_path, lambda r: resume_step is not None and r["step"] <= resume_step)
        loggers = cfg.get("logger") or {}
        self.trackers = [TRACKERS[name](settings, cfg, self.out_dir, flat_hparams(cfg), resume_step,
                                        experiment_name(cfg)) for name, settings in loggers.items() if name in TRACKERS]
        self.writer = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter
            # Purge what a dead earlier run left beyond the resume point (all of it when starting afresh).
            purge = 0 if resume_step is None else examples_seen(resume_step, cfg.batch_size) + 1
            self.writer = SummaryWriter(str(self.out_dir), purge_step=purge)
            exp, ssi, self._sei = hparams_summaries(cfg)
            if resume_step is None:
                self.writer.file_writer.add_summary(exp)
                self.writer.file_writer.add_summary(ssi)
                self.writer.add_custom_scalars(custom_scalars_layout())

    def log(self, record: dict) -> None:
        """One evaluation: appended to metrics.jsonl (flushed to disk), then the loggers."""
        self.records.append(record)
        append_jsonl(self.metrics_path, [record])
        tracked = {k: v for k, v in record.items() if k not in TRACKED_AS_SCALARS}
        for tracker in self.trackers:
            tracker.log(tracked, record["step"])
        if self.writer is not None:
            step = record["examples_seen"]
            for key, value in record.items():
                tag = tensorboard_tag(key)
                if tag is not None:
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars outside the evaluation records (the training loss and lr of every log
        point, the per-layer mean shift) at optimizer ``step``; TensorBoard's x-axis is
        examples seen."""
        for tracker in self.trackers:
            tracker.log(values, step)
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, examples_seen(step, self.batch_size))

    def close(self, summary: dict) -> None:
        write_json(self.out_dir / SUMMARY, summary)
        for tracker in self.trackers:
            tracker.close(summary)
        if self.writer is not None:
            self.writer.file_writer.add_summary(self._sei)
            self.writer.close()
