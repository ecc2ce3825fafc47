"""msr_train.integrations.lightning.MethodCallback in a real Lightning Trainer on the CPU:
the invariant holds with gradient clipping by value, the steps equal msr_train.attach in a
plain loop, a checkpoint resumes, and misuse is a clear error."""

import copy

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader

import msr_train
from helpers import batches, slice_drift

L = pytest.importorskip("lightning.pytorch", reason='the [lightning] extra: pip install -e ".[lightning]"')
from msr_train.integrations.lightning import MethodCallback  # noqa: E402

pytestmark = pytest.mark.slow  # trains a ResNet-18 for a few steps in Lightning
torch.set_num_threads(1)
LR = 0.05


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, groups: bool = True):
        super().__init__()
        self.net, self.groups = net, groups

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        params = msr_train.param_groups(self.net, lr=LR) if self.groups else self.net.parameters()
        return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4)


def loader(n=5):
    return DataLoader(batches(n), batch_size=None)


def trainer(method="msr", **kwargs):
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[MethodCallback(method, module="net")], **kwargs)


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


@pytest.mark.parametrize("clip", ["value", "norm"])
def test_converted_in_setup_and_zero_mean_after_clipped_steps(clip):
    module = Classifier(resnet18())
    trainer(max_steps=5, gradient_clip_val=0.01, gradient_clip_algorithm=clip).fit(module, loader())
    assert getattr(module.net, "msr_train_method").name == "msr"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in module.net.modules())
    assert slice_drift(module.net) < 1e-6


def test_lightning_steps_equal_attach_in_a_plain_loop():
    net = msr_train.convert(resnet18(), "msr")
    hand = copy.deepcopy(net)
    module = Classifier(net)
    torch.manual_seed(1)  # the same noise draws in both loops
    trainer(None, max_steps=5).fit(module, loader())  # an msr-train model: MethodCallback(None) uses its method
    optimizer = torch.optim.SGD(msr_train.param_groups(hand, lr=LR), lr=LR, momentum=0.9, weight_decay=5e-4)
    msr_train.attach(optimizer, hand)
    torch.manual_seed(1)
    for x, y in loader():  # a DataLoader as in Lightning: its iterator draws a seed too
        optimizer.zero_grad()
        nn.functional.cross_entropy(hand(x), y).backward()
        optimizer.step()
    for (name, a), b in zip(module.net.state_dict().items(), hand.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_a_checkpoint_resumes_the_same_steps(tmp_path):
    data = DataLoader(batches(3), batch_size=None)
    straight = Classifier(resnet18())
    torch.manual_seed(1)
    trainer(max_epochs=2).fit(straight, data)
    first = Classifier(resnet18())
    t = trainer(max_epochs=1)
    torch.manual_seed(1)
    t.fit(first, data)
    t.save_checkpoint(tmp_path / "epoch1.ckpt")
    resumed = Classifier(resnet18())  # unconverted: the callback converts it, then the checkpoint fills it
    trainer(max_epochs=2).fit(resumed, data, ckpt_path=tmp_path / "epoch1.ckpt")
    for (name, a), b in zip(resumed.net.state_dict().items(), straight.net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert slice_drift(resumed.net) < 1e-6


def test_misuse_is_a_clear_error():
    with pytest.raises(ValueError, match="lr_mult"):
        trainer(max_steps=1).fit(Classifier(resnet18(), groups=False), loader(1))
    with pytest.raises(ValueError, match="no submodule 'body'; its children: net"):
        MethodCallback("msr", module="body").network(Classifier(resnet18()))
    with pytest.raises(ValueError, match="cannot be applied by swapping layers"):
        MethodCallback("nf", module="net").setup(None, Classifier(resnet18()), "fit")
    with pytest.raises(ValueError, match="precise_bn_batches"):
        MethodCallback("bn", precise_bn_batches=10)
