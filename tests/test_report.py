"""What the person watching a run reads (msr_train.report): the banner's notes and the end
report's wording, checked on the functions that write them."""

import torch

from conftest import make_cfg
from msr_train.data import DatasetInfo
from msr_train.distributed import Context
from msr_train.report import end_report, epoch_line, size_note, start_banner

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
INFO = DatasetInfo("synthetic", 1, 16, 10, 256, 128, 0, source="generated")


def banner(*overrides, device=CPU, params=75_066, total_steps=16, steps_per_epoch=8):
    cfg = make_cfg("debug=quick", *overrides)
    return start_banner(cfg, "run", device, Context(), INFO, params, total_steps, steps_per_epoch).splitlines()


def test_the_banner_says_how_each_step_is_computed_and_where_the_run_stops():
    lines = banner("trainer.accumulate=2", "trainer.max_steps=3", total_steps=3)
    assert lines[4].endswith("2 epochs = 16 steps, stopped at step 3 (trainer.max_steps)")
    assert lines[5] == "  step      precision 32, 2 micro-batch(es) per step (trainer.accumulate), eager (trainer.compile)"
    assert banner()[4].endswith("2 epochs = 16 steps")


def test_the_banner_notes_what_is_slow_on_a_cpu():
    assert banner("trainer.precision=16-mixed")[5].endswith("note: float16 on the CPU is many times slower than 32 "
                                                            "(use 32 or bf16 there)")
    assert "note" not in banner("trainer.precision=bf16")[5]
    assert size_note("resnet50", 23_493_194, CPU) == [
        "  note      resnet50 (23 M parameters) is slow on a CPU: time a few steps first (trainer.max_steps=20), "
        "or train it on a GPU (trainer.accelerator=cuda)"]
    assert size_note("resnet50", 23_493_194, CUDA) == [] and size_note("resnet20", 272_474, CPU) == []


def test_the_end_report_and_epoch_lines_say_what_their_numbers_are():
    summary = {"status": "completed", "step": 0, "total_time_s": 3.0, "img_per_s": 0.0, "final_test_acc": 0.5}
    assert end_report(summary, "run").splitlines()[0] == \
        "msr-train: completed at step 0 after 3 s (no training step timed in this launch)"
    record = {"epoch": 2.0, "train_loss": 0.5, "train_acc": 0.8, "wall_time_s": 75.0}
    assert epoch_line(record, 4) == "epoch 2/4: train loss 0.5000, train acc 80.00%, 1 min 15 s since the start"


def test_the_banner_suggests_compiling_for_small_eager_cpu_batches_only():
    def noted(*overrides, device=CPU):
        return any("trainer.compile=true" in line for line in banner(*overrides, device=device))
    assert noted("batch_size=8") and noted("batch_size=16", "trainer.accumulate=2")
    assert not noted("batch_size=16") and not noted("batch_size=8", "trainer.compile=true")
    assert not noted("batch_size=8", device=CUDA)


def test_the_banner_warns_that_msr_has_not_trained_a_plain_stack():
    assert any("msr has not trained a plain stack like vgg11 at the rates measured" in line for line in banner("model=vgg11", "method=msr"))
    assert any("plain stack" in line for line in banner("model=vgg16", "method=msr_authors"))
    assert any("scale_init=preserve_variance has trained a plain stack like vgg11 only in short" in line
               for line in banner("model=vgg11", "method=msr_vp"))
    assert not any("plain stack" in line for line in banner("model=vgg16", "method=bn"))
    assert not any("plain stack" in line for line in banner("model=resnet20", "method=msr"))
