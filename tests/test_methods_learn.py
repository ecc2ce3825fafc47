"""Every method learns at its own defaults: a short run on real Fashion-MNIST must reach a
validation accuracy far above chance (10%). A method that passes its invariant tests
but does not learn fails here."""

import pytest

from conftest import make_cfg
from msr_train.methods import METHODS
from msr_train.train import train
from helpers import FASHION, needs_fashion

pytestmark = pytest.mark.slow  # real runs, processes or sweeps: deselect with -m 'not slow'

#: 4,000 training images, 2 epochs at batch 16 (500 steps): seconds per method on one thread.
#: The methods' defaults on the plain data recipe: the default run's flips and label
#: smoothing slow the first few hundred steps (nf at batch 32: 60% -> 43% here) and pay
#: over its 18 epochs. At batch 32 nf reached 60.1%, on the threshold; at 16 every method
#: has room (measured 2026-11, best validation accuracy: none 70.5%, gn 72.4%, bnp 74.2%, nf 75.6%,
#: msr 77.5%, bn 78.0%, gn_ws 78.3%, mimicnorm 79.4%).
SHORT_RUN = ["model=resnet8", f"dataset.root={FASHION}", "dataset.download=false", "dataset.train_size=4000",
             "dataset.val_size=1000", "dataset.test_size=500", "batch_size=16", "epochs=2",
             "dataset.augment=none", "trainer.label_smoothing=0",
             "trainer.progress_bar=false", "logger=none", "trainer.checkpoint=false",
             "trainer.cpu_threads=1"]


@needs_fashion
@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_learns_at_its_defaults(tmp_path, method):
    summary = train(make_cfg(*SHORT_RUN, f"method={method}"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["best_val_acc"] > 0.6, summary["best_val_acc"]


@needs_fashion
def test_the_variance_preserving_preset_learns_a_plain_vgg(tmp_path):
    """method=msr_vp on VGG-11 (no skip path: the paper's 0.8 scale init leaves its logits
    near zero, docs/results.md) learns on the same data at 0.0125x msr_paper's ResNet-20
    rate with the 10-epoch protocol's epoch of warmup: a rate a factor of 4 below the one
    that diverged here (0.05x; 0.025x learned too, but diverged without warmup)."""
    run = [o for o in SHORT_RUN if not o.startswith(("model=", "batch_size=", "dataset.train_size="))]
    summary = train(make_cfg(*run, "model=vgg11", "method=msr_vp", "optimizer.lr=0.0025", "batch_size=32",
                             "dataset.train_size=2000", "scheduler.warmup_epochs=1"), tmp_path)
    assert summary["status"] == "completed"
    assert summary["best_val_acc"] > 0.5, summary["best_val_acc"]
