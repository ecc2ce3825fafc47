"""Every experiment preset composes with every method into a config that passes the
up-front checks (interpolations such as optimizer.lr -> method.lr included)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import make_cfg
from msr_train.checks import validate_config
from msr_train.methods import METHODS, build_method

PRESETS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_method(preset, method):
    cfg = make_cfg(f"experiment={preset}", f"method={method}")
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    build_method(cfg.method, cfg.batch_size)


def test_the_comparison_preset_is_the_documented_protocol():
    cfg = make_cfg("experiment=fashion_mnist_comparison", "method=nf")
    assert (cfg.model.name, cfg.epochs, cfg.dataset.train_size, cfg.dataset.val_size) == ("resnet8", 3, 10_000, 5_000)
    assert cfg.optimizer.lr == cfg.method.lr == 0.3  # each method's own lr
    assert cfg.optimizer.lr_scaling == "sqrt"
