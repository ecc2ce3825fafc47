"""The config tree matches the code: every preset composes with every method, passes the
up-front checks and trains; every model and method config names something registered."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from conftest import make_cfg
from msr_train.checks import validate_config
from msr_train.errors import ConfigError
from msr_train.methods import METHODS, build_method
from msr_train.models import ARCHITECTURES
from msr_train.train import train

CONF = Path(__file__).resolve().parents[1] / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def group_names(group: str) -> dict[str, str]:
    """conf/<group>/<file>.yaml -> the ``name`` it composes to (a preset such as
    method/msr_paper.yaml extends method/msr.yaml through its defaults list)."""
    return {p.stem: make_cfg(f"{group}={p.stem}")[group].name for p in (CONF / group).glob("*.yaml")}


@pytest.mark.parametrize("group,registry", [("model", ARCHITECTURES), ("method", METHODS)])
def test_every_config_names_a_registered_entry_and_every_entry_has_a_config(group, registry):
    names = group_names(group)
    assert set(names.values()) == set(registry)
    assert all(names.get(name) == name for name in registry), names  # each has a config of its own name
    presets = {stem for stem, name in names.items() if stem != name}
    assert all(stem.startswith(f"{names[stem]}_") for stem in presets), presets  # msr_paper: a preset of msr


def test_every_method_config_sets_its_own_lr():
    for path in (CONF / "method").glob("*.yaml"):
        own = yaml.safe_load(path.read_text())
        if "defaults" in own:  # a preset: the lr of the config it extends
            assert "lr" not in own or isinstance(own["lr"], float), path
        else:
            assert isinstance(own.get("lr"), float), path


def preset_method_settings(preset: str) -> bool:
    """Whether a preset sets method.* keys, which tie it to its own method."""
    return bool(yaml.safe_load((CONF / "experiment" / f"{preset}.yaml").read_text()).get("method"))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_method(preset, method):
    if preset_method_settings(preset):
        own = make_cfg(f"experiment={preset}").method.name
        if method != own:  # e.g. the MSR authors' recipe sets MSR's zmg_alpha: refused for others, by name
            with pytest.raises(ConfigError, match=r"method\.\w+ is not a setting of method"):
                validate_config(make_cfg(f"experiment={preset}", f"method={method}"))
            return
    cfg = make_cfg(f"experiment={preset}", f"method={method}")
    OmegaConf.resolve(cfg)
    validate_config(cfg)
    build_method(cfg.method, cfg.batch_size)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_two_steps(preset, tmp_path):
    # The preset's model, method and recipe on debug=quick's generated data (CIFAR and the
    # full datasets are not on the test machine); epochs=5 outlasts any preset's warmup
    # (debug=quick's 2 epochs would not), trainer.max_steps ends it.
    model = make_cfg(f"experiment={preset}").model.name
    cfg = make_cfg(f"experiment={preset}", "debug=quick", f"model={model}", "epochs=5", "dataset.train_size=null",
                   "dataset.val_size=32", "batch_size=16", "trainer.max_steps=2", "trainer.cpu_threads=1")
    summary = train(cfg, tmp_path)
    assert (summary["status"], summary["step"], summary["model"]) == ("completed", 2, model)
    assert summary["best_val_acc"] is not None and summary["selected_test_acc"] is not None


def test_the_comparison_preset_is_the_documented_protocol():
    cfg = make_cfg("experiment=fashion_mnist_comparison", "method=nf")
    assert (cfg.model.name, cfg.epochs, cfg.dataset.train_size, cfg.dataset.val_size) == ("resnet8", 3, 10_000, 5_000)
    assert cfg.optimizer.lr == cfg.method.lr == 0.2  # each method's own lr
    assert cfg.optimizer.lr_scaling == "sqrt"


def authors_flags() -> dict[str, str]:
    """The MSR authors' run flags as docs/methods.md quotes them (-name=value, or -name)."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "methods.md").read_text()
    quoted = re.search(r"\(`(-classunitydecay[^`]*)`\)", text, re.S).group(1)
    return dict((f.lstrip("-").split("=") + ["true"])[:2] for f in quoted.split())


def test_the_authors_msr_preset_is_their_run_as_docs_methods_quotes_it():
    """experiment=cifar10_resnet110_msr trains what the authors' cited run trained: each
    learning rate, init, operator, noise and anchor against their flags, and the recipe
    (docs/methods.md "msr", item 7) against the optimizer and schedule actually built."""
    from msr_train.methods.msr import MSRConv2d
    from msr_train.models import build_model
    from msr_train.optim import build_optimizer
    flags = authors_flags()
    cfg = make_cfg("experiment=cifar10_resnet110_msr")
    m = cfg.method
    assert (cfg.model.name, cfg.dataset.name, cfg.dataset.augment) == (flags["a"], "cifar10", "crop_flip")
    assert (m.zmg_operator, m.zmg_m) == ("authors", float(flags["zmg"]))
    assert (m.init_magnitude, m.scale_init) == (float(flags["convinitmag"]), float(flags["scalinginitmag"]))
    assert m.anchor_weight == float(flags["filterl2scaleloss"]) == float(flags["classunitydecay"])
    assert m.noise_at == "off"  # -noise without -inputnoise builds no noise layer (item 5)
    assert (m.stem, m.stem_bias, m.weight_decay) == ("plain", flags["inputhasbias"] == "true", 0.0)
    assert (cfg.batch_size, cfg.epochs, cfg.optimizer.momentum, cfg.trainer.label_smoothing) == (128, 200, 0.9, 0.0)
    assert (list(cfg.scheduler.milestones), cfg.scheduler.gamma, cfg.scheduler.warmup_epochs) == ([100, 150], 0.1, 0)
    method = build_method(m, batch_size=cfg.batch_size)
    model = build_model(cfg.model.name, method, in_channels=3, num_classes=10, image_size=32)
    optimizer = build_optimizer(cfg.optimizer, method.param_groups(model), cfg.batch_size)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert all(g["weight_decay"] == 0.0 for g in optimizer.param_groups)  # -l2decay unset
    for module in model.modules():
        if isinstance(module, MSRConv2d):  # the stem's weight too (their Conv1Weight is in the conv group)
            assert lr_of[id(module.weight)] == pytest.approx(float(flags["lr"]))
            if module.role != "stem":
                assert lr_of[id(module.log_scale)] == pytest.approx(float(flags["scalinglr"]))
            if module.bias is not None:
                assert lr_of[id(module.bias)] == pytest.approx(float(flags["biaslr"]))
        elif isinstance(module, torch.nn.Linear):
            assert lr_of[id(module.weight)] == pytest.approx(float(flags["classlr"]))
