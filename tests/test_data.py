"""Data loading from local files: IDX (MNIST format), ImageFolder, augmentation."""

import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_cfg
from msr_train.data import _read_idx, build_data, crop_flip, random_erase
from msr_train.errors import ConfigError

CPU = torch.device("cpu")


def write_idx(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 28, 28)) for s, n in (("train", 40), ("t10k", 10))}
    labels = {s: rng.integers(0, 10, len(images[s])) for s in images}
    for s in images:
        write_idx(tmp_path / f"{s}-images-idx3-ubyte.gz", images[s])
        write_idx(tmp_path / f"{s}-labels-idx1-ubyte.gz", labels[s])
    assert np.array_equal(_read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images["t10k"])
    cfg = make_cfg("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false", "dataset.val_size=0").dataset
    data = build_data(cfg, batch_size=8, eval_batch_size=4, seed=0, device=CPU)
    info, train, test = data.info, data.train, data.test
    assert (info.in_channels, info.image_size, info.train_size, info.val_size, info.test_size) == (1, 28, 40, 0, 10)
    assert data.val is None and len(train) == 5 and len(test) == 3
    x, y = next(iter(test))
    expected = (torch.tensor(images["t10k"][:4], dtype=torch.float32)[:, None] / 255 - 0.1307) / 0.3081
    assert torch.allclose(x, expected, atol=1e-5) and y.tolist() == labels["t10k"][:4].tolist()


def test_imagefolder_layout(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    cfg = make_cfg("dataset=imagenet", f"dataset.root={tmp_path}", "dataset.image_size=32",
                   "dataset.num_workers=0", "dataset.num_classes=2", "dataset.val_size=2").dataset
    # No test/ folder: val/ is the test set and validation is held out of train/, one per class.
    data = build_data(cfg, batch_size=2, eval_batch_size=4, seed=0, device=CPU)
    assert (data.info.train_size, data.info.val_size, data.info.test_size, data.info.image_size) == (4, 2, 6, 32)
    x, y = next(iter(data.train))
    assert x.shape == (2, 3, 32, 32) and set(y.tolist()) <= {0, 1}
    assert sorted(y for _, y in data.val.loader.dataset) == [0, 1]
    # With a test/ folder, val/ is the validation set.
    (tmp_path / "val").rename(tmp_path / "test")
    (tmp_path / "train").rename(tmp_path / "val")
    (tmp_path / "test").rename(tmp_path / "train")
    (tmp_path / "val").rename(tmp_path / "test")
    for cls in ("cat", "dog"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "val" / cls / "0.png")
    data = build_data(cfg, batch_size=2, eval_batch_size=4, seed=0, device=CPU)
    assert (data.info.train_size, data.info.val_size, data.info.test_size) == (6, 2, 6)
    with pytest.raises(ConfigError, match="ImageFolder"):
        build_data(make_cfg("dataset=imagenet", f"dataset.root={tmp_path / 'nowhere'}").dataset,
                   batch_size=2, eval_batch_size=2, seed=0, device=CPU)


def test_crop_flip_returns_shifted_or_mirrored_crops_of_the_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    out = crop_flip(x, torch.Generator().manual_seed(3), pad=2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for b in range(2):
        crops = [padded[b, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
        candidates = crops + [c.flip(-1) for c in crops]
        assert any(torch.equal(out[b], c) for c in candidates)


def test_flip_alone_mirrors_or_keeps_each_image():
    cfg = make_cfg("dataset=synthetic", "dataset.augment=flip").dataset
    flipped = build_data(cfg, batch_size=64, eval_batch_size=64, seed=0, device=CPU).train
    plain = build_data(make_cfg("dataset=synthetic").dataset, batch_size=64, eval_batch_size=64, seed=0,
                       device=CPU).train
    (x, _), (x0, _) = next(iter(flipped)), next(iter(plain))
    mirrored = [torch.equal(a, b.flip(-1)) and not torch.equal(a, b) for a, b in zip(x, x0)]
    assert all(m or torch.equal(a, b) for m, a, b in zip(mirrored, x, x0)) and 10 < sum(mirrored) < 54


def erased_boxes(p, n=2000, seed=0):
    """The bounding box (height, width) of the changed pixels of each image of n black
    28x28 images after random erasing, None where nothing changed."""
    out = random_erase(torch.zeros(n, 1, 28, 28, dtype=torch.uint8), torch.Generator().manual_seed(seed), p)
    boxes = []
    for changed in (out[:, 0] != 0):
        rows, cols = changed.any(1).nonzero()[:, 0], changed.any(0).nonzero()[:, 0]
        if len(rows) == 0:
            boxes.append(None)
            continue
        box = changed[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.float().mean() > 0.9  # one box of noise (a random fill value may be 0)
        boxes.append((len(box), len(box[0])))
    return boxes


def test_random_erasing_puts_one_box_of_the_papers_sizes_in_a_share_p_of_the_images():
    boxes = erased_boxes(0.5)
    share = sum(b is not None for b in boxes) / len(boxes)
    assert abs(share - 0.5) < 4 * (0.25 / len(boxes)) ** 0.5
    sizes = [b for b in boxes if b is not None]
    areas = torch.tensor([h * w / 784 for h, w in sizes])
    aspects = torch.tensor([h / w for h, w in sizes])
    # Area 2-40% and aspect 0.3-3.3 of the paper, up to rounding each side to whole pixels.
    assert areas.min() >= 0.012 and areas.max() <= 0.45 and 0.15 < areas.mean() < 0.25
    assert aspects.min() >= 0.25 and aspects.max() <= 4 and (aspects < 1).any() and (aspects > 1).any()
    assert erased_boxes(0.0, n=50) == [None] * 50 and all(erased_boxes(1.0, n=200))
    assert erased_boxes(0.5, n=50, seed=3) == erased_boxes(0.5, n=50, seed=3)


def test_random_erasing_touches_training_batches_only():
    def first_batches(p):
        cfg = make_cfg("dataset=synthetic", "dataset.val_size=64", f"dataset.random_erasing={p}").dataset
        data = build_data(cfg, batch_size=32, eval_batch_size=64, seed=0, device=CPU)
        return [next(iter(split))[0] for split in (data.train, data.val, data.test)]
    (train, val, test), (train0, val0, test0) = first_batches(1.0), first_batches(0.0)
    assert torch.equal(val, val0) and torch.equal(test, test0)
    assert all(not torch.equal(a, b) for a, b in zip(train, train0))  # every training image got a box


def offline(monkeypatch):
    """Every download fails the way it does behind a dead proxy (and fast)."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")


@pytest.mark.parametrize("name", ["fashion_mnist", "mnist", "cifar10"])
def test_data_that_cannot_be_found_or_downloaded_is_a_clear_error_leaving_nothing(tmp_path, monkeypatch, name):
    import msr_train.data as data
    offline(monkeypatch)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian-copy")
    root = tmp_path / "data" / "nested"
    cfg = make_cfg(f"dataset={name}", f"dataset.root={root}", "dataset.download=true").dataset
    with pytest.raises(ConfigError) as err:
        build_data(cfg, batch_size=8, eval_batch_size=8, seed=0, device=CPU)
    message = str(err.value)
    assert f"dataset={name}: no data in {root}" in message and "the download failed" in message
    assert "(1) with network access, dataset.download=true" in message and "set dataset.root to it" in message
    assert ("apt-get install dataset-fashion-mnist" in message) == (name == "fashion_mnist")
    assert not (tmp_path / "data").exists()  # no half-made folders


def test_without_download_the_error_says_where_it_looked(tmp_path):
    cfg = make_cfg("dataset=mnist", f"dataset.root={tmp_path}", "dataset.download=false").dataset
    with pytest.raises(ConfigError, match=f"dataset=mnist: no data in {tmp_path}, {tmp_path}/MNIST/raw "
                                          r"\(dataset.download=false\)"):
        build_data(cfg, batch_size=8, eval_batch_size=8, seed=0, device=CPU)


def test_a_dataset_root_that_does_not_exist_is_named_when_debians_copy_is_used(tmp_path, monkeypatch):
    import msr_train.data as data
    debian = tmp_path / "debian"
    debian.mkdir()
    rng = np.random.default_rng(0)
    for s, n in (("train", 40), ("t10k", 10)):
        write_idx(debian / f"{s}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(debian / f"{s}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", debian)
    cfg = make_cfg("dataset=fashion_mnist", f"dataset.root={tmp_path / 'nonexistent'}", "dataset.val_size=0").dataset
    info = build_data(cfg, batch_size=8, eval_batch_size=4, seed=0, device=CPU).info
    assert info.source == f"{debian} (dataset.root={tmp_path / 'nonexistent'} does not exist)"  # the banner shows it
    cfg = make_cfg("dataset=fashion_mnist", f"dataset.root={tmp_path}", "dataset.val_size=0").dataset
    assert build_data(cfg, batch_size=8, eval_batch_size=4, seed=0, device=CPU).info.source == \
        f"{debian} (dataset.root={tmp_path} holds none of its files)"
