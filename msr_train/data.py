"""Datasets through torchvision, held in memory as uint8 tensors where they fit, split
into train / validation / test.

Validation (``dataset.val_size`` images, 0 for none) is held out of the *training* set,
stratified by class, by a generator seeded with ``dataset.split_seed``: it is the same
for every run whatever its ``seed``, and disjoint from what is trained on. Model
selection and tuning look at it; the test set is only evaluated, never selected on.
``train_size`` / ``test_size`` subsets are drawn from the same fixed generator, so the
images a run sees do not change with its seed either (the seed changes the init, the
data order and the noise).

Small datasets (MNIST, Fashion-MNIST, CIFAR, synthetic) live as one uint8 tensor on the
training device; batches are cut by index, augmented on tensors (4-px pad-crop and
horizontal flip, or flip alone; random erasing; batched) and normalised there, so the data path never starves the
model and needs no worker processes. ImageNet (ImageFolder layout) streams from disk
through a DataLoader with ``num_workers`` workers.

The training order of epoch e is a permutation drawn from a generator seeded with
(seed, e): it does not depend on what ran before, so a resumed run sees the same order.
"""

from __future__ import annotations

import copy
import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, describe
from .rules import (Rule, added_later, choice, flag, integer, is_int, is_number, number, resumable, text,
                    unknown)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    in_channels: int
    image_size: int
    num_classes: int
    train_size: int
    test_size: int
    val_size: int = 0
    #: Where the images came from (a folder, or "generated"), for the start banner.
    source: str = ""


@dataclass(frozen=True)
class Data:
    """What a run trains and evaluates on; ``val`` is None when dataset.val_size is 0."""
    info: DatasetInfo
    train: object
    val: object | None
    test: object


def split_indices(labels: torch.Tensor, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index sets of a training set with these labels: ``val_size`` images
    held out, stratified by class (each class gives its share, up to rounding), chosen by
    a generator seeded with ``seed``. Both sorted; together they are every index once."""
    n = len(labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    y = labels[order]
    counts = torch.bincount(y)
    by_class = torch.argsort(y, stable=True)  # grouped by class, shuffled within
    rank = torch.empty(n, dtype=torch.long)
    rank[by_class] = torch.arange(n) - (counts.cumsum(0) - counts)[y[by_class]]
    # An image's position within its class, as a fraction: taking the smallest fractions
    # takes the same share of every class.
    position = (rank + 0.5) / counts[y]
    held_out = torch.zeros(n, dtype=torch.bool)
    held_out[order[torch.argsort(position, stable=True)[:val_size]]] = True
    return (~held_out).nonzero().flatten(), held_out.nonzero().flatten()


# ----------------------------------------------------------------------------- loading
def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (the MNIST format)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _data_missing(cfg, looked_in: list[Path], files: str, why: str, debian_dir: Path | None) -> ConfigError:
    """Where the data was looked for, why it is not there, and the ways to get it."""
    ways = ["with network access, dataset.download=true fetches it through torchvision into dataset.root"]
    if debian_dir is not None:
        ways.append(f"on Debian or Ubuntu, apt-get install dataset-{cfg.name.replace('_', '-')} puts it in {debian_dir}")
    ways.append(f"put {files} in a folder and set dataset.root to it")
    listed = "; ".join(f"({i}) {way}" for i, way in enumerate(ways, 1))
    return ConfigError(f"dataset={cfg.name}: no data in {', '.join(map(str, looked_in))} ({why}). Get it one of "
                       f"{len(ways)} ways: {listed}.")


def _download(cfg, fetch, missing) -> dict:
    """``fetch()`` (torchvision downloads into dataset.root); if it fails, whatever it
    created is removed and ``missing(why)`` is raised: no half-made folders are left."""
    root = Path(os.path.expanduser(cfg.root)).absolute()
    new_dirs = [d for d in (root, *root.parents) if not d.exists()]
    before = set(root.rglob("*")) if root.exists() else set()
    try:
        return fetch()
    except Exception as e:  # no network, a proxy, a partial or corrupt download: torchvision raises many types
        made = (set(root.rglob("*")) if root.exists() else set()) - before
        for path in sorted(made, key=lambda p: len(p.parts), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        for folder in new_dirs:  # innermost first
            if folder.exists():
                folder.rmdir()
        raise missing(f"the download failed: {describe(e)}") from None


def _load_mnist_like(cfg, torchvision_class: str, debian_dir: Path | None):
    """MNIST-format data from dataset.root (flat or torchvision's layout), Debian's copy,
    or a torchvision download, in that order."""
    root = Path(os.path.expanduser(cfg.root))
    folders = [root, root / torchvision_class / "raw"] + ([debian_dir] if debian_dir else [])
    stems = {"train": "train", "test": "t10k"}
    found = {split: (_find_idx(folders, f"{s}-images-idx3-ubyte"), _find_idx(folders, f"{s}-labels-idx1-ubyte"))
             for split, s in stems.items()}
    if all(p for pair in found.values() for p in pair):
        source = found["train"][0].parent
        # The banner says where the data came from, and so why a dataset.root was not used.
        why = "does not exist" if not root.exists() else "holds none of its files"
        unused = f" (dataset.root={cfg.root} {why})" if source == debian_dir else ""
        return {s: (_read_idx(xp)[:, None], _read_idx(yp)) for s, (xp, yp) in found.items()}, f"{source}{unused}"

    def missing(why):
        return _data_missing(cfg, folders, "train-images-idx3-ubyte(.gz) and the other three IDX files", why,
                             debian_dir)
    if not cfg.download:
        raise missing("dataset.download=false")

    def fetch():
        import torchvision.datasets as tvd
        root.mkdir(parents=True, exist_ok=True)
        splits = {split: getattr(tvd, torchvision_class)(str(root), train=split == "train", download=True)
                  for split in stems}
        return {s: (ds.data.numpy()[:, None], ds.targets.numpy()) for s, ds in splits.items()}, \
            f"{root / torchvision_class / 'raw'} (downloaded)"
    return _download(cfg, fetch, missing)


def _load_cifar(cfg, torchvision_class: str):
    import torchvision.datasets as tvd
    root = Path(os.path.expanduser(cfg.root))
    folder = "cifar-10-batches-py" if torchvision_class == "CIFAR10" else "cifar-100-python"

    def missing(why):
        return _data_missing(cfg, [root / folder], f"{folder}/ (the python version of the dataset)", why, None)

    def load(download):
        splits = {split: getattr(tvd, torchvision_class)(str(root), train=split == "train", download=download)
                  for split in ("train", "test")}
        return {s: (ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)) for s, ds in splits.items()}, \
            str(root / folder)
    if (root / folder).is_dir() or not cfg.download:
        try:
            return load(download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise missing(str(e).rstrip(".") if cfg.download else "dataset.download=false") from None
    return _download(cfg, lambda: load(download=True), missing)


def _make_synthetic(cfg):
    """Learnable random data: each class is a fixed random template plus pixel noise."""
    g = torch.Generator().manual_seed(cfg.synthetic_seed)
    shape = (cfg.channels, cfg.image_size, cfg.image_size)
    templates = torch.rand((cfg.num_classes, *shape), generator=g) * 255
    out = {}
    for split, n in (("train", cfg.synthetic_train), ("test", cfg.synthetic_test)):
        y = torch.randint(cfg.num_classes, (n,), generator=g)
        x = templates[y] + cfg.synthetic_noise * 255 * torch.randn((n, *shape), generator=g)
        out[split] = (x.clamp(0, 255).to(torch.uint8).numpy(), y.numpy())
    return out, "generated (dataset.synthetic_*)"


IN_MEMORY_LOADERS = {
    "fashion_mnist": lambda cfg: _load_mnist_like(cfg, "FashionMNIST", DEBIAN_FASHION_MNIST),
    "mnist": lambda cfg: _load_mnist_like(cfg, "MNIST", None),
    "cifar10": lambda cfg: _load_cifar(cfg, "CIFAR10"),
    "cifar100": lambda cfg: _load_cifar(cfg, "CIFAR100"),
    "synthetic": _make_synthetic,
}
DATASETS = [*IN_MEMORY_LOADERS, "imagenet"]
#: (image channels, classes) of the named datasets; None: set by the config.
SHAPES = {"fashion_mnist": (1, 10), "mnist": (1, 10), "cifar10": (3, 10), "cifar100": (3, 100),
          "imagenet": (3, None), "synthetic": (None, None)}
_SYNTHETIC_RULES = {"channels": integer(1), "image_size": integer(4), "synthetic_train": integer(1),
                    "synthetic_test": integer(1), "synthetic_noise": number(0, 100), "synthetic_seed": integer(0, 2**31 - 1)}


def _per_channel(channels: int | None, positive: bool, source: str) -> Rule:
    what = f"{channels} number(s), one per image channel ({source})" if channels else \
        "a list of numbers, one per channel"
    return Rule(lambda v: isinstance(v, list) and len(v) > 0 and (channels is None or len(v) == channels)
                and all(is_number(x) and (x > 0 or not positive) for x in v), what + (", each > 0" if positive else ""))


def dataset_rules(cfg) -> dict[str, Rule]:
    """The rules of every dataset.* setting of dataset ``cfg.name`` (see msr_train.rules)."""
    if cfg.name not in SHAPES:
        raise unknown("dataset", cfg.name, DATASETS)
    channels, classes = SHAPES[cfg.name]
    if cfg.name == "synthetic" and is_int(cfg.get("channels")) and cfg.channels >= 1:
        channels = cfg.channels
    source = f"dataset.channels={channels}" if cfg.name == "synthetic" else f"{cfg.name} images"
    # The synthetic settings first: its channels decide what mean and std must be.
    rules = dict(_SYNTHETIC_RULES) if cfg.name == "synthetic" else {}
    rules |= {
        "name": choice(*DATASETS), "root": resumable(text()), "download": resumable(flag()),
        "train_size": integer(1, null=True, note="null: all"), "test_size": integer(1, null=True, note="null: all"),
        "val_size": integer(0, note="training images held out for validation; 0: no validation split"),
        "split_seed": integer(0, 2**31 - 1), "num_workers": resumable(integer(0)),
        "num_classes": choice(classes, note=f"{cfg.name} has {classes} classes") if classes else integer(2),
        "mean": _per_channel(channels, False, source), "std": _per_channel(channels, True, source),
    }
    if cfg.name == "imagenet":
        rules["image_size"] = integer(8)
    else:
        rules["augment"] = choice("none", "flip", "crop_flip")
        rules["random_erasing"] = added_later(number(0, 1, note="probability that a training image gets an erased "
                                                     "box; 0: off"), 0.0)
    return rules


# ----------------------------------------------------------------------------- batches
class TensorBatches:
    """Batches of an in-memory uint8 dataset, augmented and normalised on its device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, mean, std, *, batch_size: int,
                 train: bool, augment: str, seed: int, shard: tuple[int, int] = (0, 1),
                 indices: torch.Tensor | None = None, random_erasing: float = 0.0):
        self.x, self.y = x, y
        # Where each image sits in the dataset's own split (the original training set for
        # train and validation batches): what the split tests check.
        self.indices = torch.arange(len(y)) if indices is None else indices
        # (rank, world size): each batch is cut, augmented as a whole, then the rank keeps
        # its part: a contiguous block of a training batch, every W-th test example.
        self.rank, self.world_size = shard
        self.mean = torch.tensor(mean, device=x.device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, device=x.device).view(1, -1, 1, 1) * 255
        self.batch_size, self.train, self.augment, self.seed = batch_size, train, augment, seed
        self.random_erasing = random_erasing
        self.epoch = self.start_batch = 0

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0):
        """Iterate epoch ``epoch`` from batch ``start_batch`` on (a resumed run skips the
        batches it has already trained on)."""
        self.epoch, self.start_batch = epoch, start_batch

    def replay(self, epoch: int):
        """Epoch ``epoch``'s batches from its first, as training sees them, without
        touching the iteration in progress (precise BN's calibration batches)."""
        again = copy.copy(self)
        again.set_epoch(epoch)
        return iter(again)

    def __iter__(self):
        n = len(self.y)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=g).to(self.x.device)
        for i in range(self.start_batch if self.train else 0, len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if not self.train:
                x, y = self.x[sl], self.y[sl]
            else:
                x, y = self._augment(self.x[order[sl]], i), self.y[order[sl]]
            if self.world_size > 1:
                if self.train:
                    part = slice(self.rank * len(y) // self.world_size, (self.rank + 1) * len(y) // self.world_size)
                else:
                    part = slice(self.rank, None, self.world_size)
                x, y = x[part], y[part]
            yield (x.float() - self.mean) / self.std, y

    def _augment(self, x: torch.Tensor, batch_index: int) -> torch.Tensor:
        if self.augment == "none" and not self.random_erasing:
            return x
        # Seeded per batch, so a resumed run draws the same crops without saved state.
        g = torch.Generator(device=x.device).manual_seed((self.seed * 100_003 + self.epoch) * 1_000_003 + batch_index)
        if self.augment != "none":
            x = crop_flip(x, g, pad=4 if self.augment == "crop_flip" else 0)  # pad 0: flip only
        return random_erase(x, g, self.random_erasing) if self.random_erasing else x


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-px pad-and-crop plus horizontal flip for a whole batch at once."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=g, device=x.device)
    flip = torch.rand(b, 1, generator=g, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device).expand(b, w)
    cols = torch.where(flip, w - 1 - cols, cols) + dx
    rows = torch.arange(h, device=x.device).expand(b, h) + dy
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def random_erase(x: torch.Tensor, g: torch.Generator, p: float, scale=(0.02, 0.4), ratio=(0.3, 1 / 0.3),
                 attempts: int = 10) -> torch.Tensor:
    """Random Erasing (Zhong et al., AAAI 2020, arXiv 1708.04896) for a whole uint8 batch.

    With probability ``p`` an image gets one box, of area a fraction in ``scale`` of the
    image's and aspect ratio h/w log-uniform in ``ratio``, filled with uniform random pixel
    values (the paper's choice). As in torchvision's RandomErasing, up to ``attempts``
    sizes are drawn per image and the first that fits is used; if none fits the image is
    left as it is."""
    b, _, h, w = x.shape
    dev = x.device
    area = h * w * torch.empty(b, attempts, device=dev).uniform_(*scale, generator=g)
    aspect = torch.empty(b, attempts, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=g).exp()
    box_h, box_w = (area * aspect).sqrt().round().long(), (area / aspect).sqrt().round().long()
    fits = (box_h < h) & (box_w < w)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits
    box_h, box_w = box_h.gather(1, first), box_w.gather(1, first)
    erased = fits.any(1, keepdim=True) & (torch.rand(b, 1, generator=g, device=dev) < p)
    top = (torch.rand(b, 1, generator=g, device=dev) * (h - box_h + 1)).long()
    left = (torch.rand(b, 1, generator=g, device=dev) * (w - box_w + 1)).long()
    rows, cols = torch.arange(h, device=dev), torch.arange(w, device=dev)
    in_rows = (rows >= top) & (rows < top + box_h) & erased
    in_cols = (cols >= left) & (cols < left + box_w)
    inside = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]
    fill = torch.randint(0, 256, x.shape, generator=g, device=dev, dtype=torch.int16).to(x.dtype)
    return torch.where(inside, fill, x)


def _subset(size: int | None, n: int, seed: int, key: str) -> torch.Tensor:
    """Indices of a fixed random subset of ``size`` of ``n`` items (all, in order, for
    None); a size beyond ``n`` is refused (``key`` names the setting), never cut short."""
    if size is not None and size > n:
        raise ConfigError(f"{key}={size} exceeds the {n:,} images there are"
                          f"{' after the validation split (dataset.val_size)' if key.endswith('train_size') else ''};"
                          f" use at most {n} or null for all of them")
    if size is None or size == n:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def check_split_sizes(cfg, available: int, batch_size: int) -> None:
    """dataset.val_size must leave at least one batch of training images."""
    val_size = cfg.val_size
    if val_size == 0 and available < batch_size:
        source = "dataset.synthetic_train" if cfg.name == "synthetic" else f"dataset={cfg.name}"
        raise ConfigError(f"the training set ({source}) has {available} images, fewer than one batch "
                          f"(batch_size={batch_size}); lower batch_size")
    if available - val_size < batch_size:
        if val_size < available:
            raise ConfigError(f"dataset.val_size={val_size} leaves {available - val_size} of the {available} training "
                              f"images, fewer than one batch (batch_size={batch_size}); lower dataset.val_size (0 for "
                              "no validation split) or batch_size")
        raise ConfigError(f"dataset.val_size={val_size} exceeds the {available} training images; lower "
                          "dataset.val_size (0 for no validation split)")


def build_data(cfg, *, batch_size: int, eval_batch_size: int, seed: int, device: torch.device,
               shard: tuple[int, int] = (0, 1)) -> Data:
    """The run's train / validation / test batches. ``batch_size`` is the global batch;
    with ``shard`` = (rank, world size) the batches yield that rank's share of every batch."""
    if cfg.name == "imagenet":
        return _build_imagefolder(cfg, batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed,
                                  shard=shard, device=device)
    if cfg.name not in IN_MEMORY_LOADERS:
        raise unknown("dataset", cfg.name, DATASETS)
    loaded, source = IN_MEMORY_LOADERS[cfg.name](cfg)
    splits = {s: (torch.as_tensor(np.ascontiguousarray(x)), torch.as_tensor(np.asarray(y), dtype=torch.long))
              for s, (x, y) in loaded.items()}
    (xtr, ytr), (xte, yte) = splits["train"], splits["test"]
    check_split_sizes(cfg, len(ytr), batch_size)
    train_idx, val_idx = split_indices(ytr, cfg.val_size, cfg.split_seed)
    train_idx = train_idx[_subset(cfg.train_size, len(train_idx), cfg.split_seed, "dataset.train_size")]
    test_idx = _subset(cfg.test_size, len(yte), cfg.split_seed, "dataset.test_size")
    if batch_size > len(train_idx):
        raise ConfigError(f"batch_size={batch_size} is larger than the training set ({len(train_idx)} images);"
                          " lower batch_size or raise dataset.train_size")

    def batches(x, y, idx, train):
        return TensorBatches(x[idx].to(device), y[idx].to(device), cfg.mean, cfg.std,
                             batch_size=batch_size if train else eval_batch_size, train=train,
                             augment=cfg.augment if train else "none", seed=seed, shard=shard, indices=idx,
                             random_erasing=cfg.random_erasing if train else 0.0)
    info = DatasetInfo(cfg.name, xtr.shape[1], xtr.shape[-1], cfg.num_classes, len(train_idx), len(test_idx),
                       len(val_idx), source=source)
    return Data(info, batches(xtr, ytr, train_idx, True),
                batches(xtr, ytr, val_idx, False) if len(val_idx) else None, batches(xte, yte, test_idx, False))


class _EpochSampler(torch.utils.data.Sampler):
    """Random order drawn from (seed, epoch), like TensorBatches; with W ranks, rank r's
    part (a contiguous block of batch / W) of every global batch of ``batch`` examples."""

    def __init__(self, n: int, seed: int, batch: int, shard: tuple[int, int]):
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.batch, (self.rank, self.world_size) = batch, shard

    def __len__(self):
        return (self.n // self.batch - self.start) * (self.batch // self.world_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        steps, local = self.n // self.batch, self.batch // self.world_size
        order = torch.randperm(self.n, generator=g)[:steps * self.batch].view(steps, self.batch)
        return iter(order[self.start:, self.rank * local:(self.rank + 1) * local].flatten().tolist())


class _Loader:
    """A DataLoader whose batches arrive on ``device`` (pinned, copied asynchronously)."""

    def __init__(self, loader, device: torch.device, sampler=None):
        self.loader, self.device, self.sampler = loader, device, sampler
        self.steps_per_epoch = len(loader)  # the full epoch, whatever batch a resumed run starts at

    def __len__(self):
        return self.steps_per_epoch

    def set_epoch(self, epoch, start_batch=0):
        if self.sampler is not None:
            self.sampler.epoch, self.sampler.start = epoch, start_batch

    def replay(self, epoch: int):
        """Epoch ``epoch``'s batches from its first, from a second loader on a copy of the
        sampler, so the iteration in progress is untouched (see TensorBatches.replay)."""
        sampler = copy.copy(self.sampler)
        sampler.epoch, sampler.start = epoch, 0
        loader = torch.utils.data.DataLoader(self.loader.dataset, self.loader.batch_size, sampler=sampler,
                                             drop_last=True, num_workers=self.loader.num_workers,
                                             pin_memory=self.loader.pin_memory)
        return iter(_Loader(loader, self.device))

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def _imagefolder_splits(cfg, root: Path):
    """(train, val, test) ImageFolder datasets. The test set is ``test/`` if present, else
    ``val/`` (ImageNet's public validation set is the usual test set). Validation is
    ``val/`` when ``test/`` exists too, else ``dataset.val_size`` images held out of
    ``train/`` (stratified, fixed by dataset.split_seed); None if that is 0."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T
    has_test = (root / "test").is_dir()
    for split in ("train", "test" if has_test else "val"):
        if not (root / split).is_dir():
            raise ConfigError(f"dataset=imagenet needs {root / split}/ in ImageFolder layout "
                              "(one folder per class); set dataset.root to the folder holding train/ and val/")
    norm = T.Normalize(cfg.mean, cfg.std)
    size = cfg.image_size
    augment = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    plain = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(), norm])
    train = tvd.ImageFolder(str(root / "train"), augment)
    test = tvd.ImageFolder(str(root / ("test" if has_test else "val")), plain)
    if has_test:
        val = tvd.ImageFolder(str(root / "val"), plain) if (root / "val").is_dir() else None
        return train, val, test
    targets = torch.as_tensor(train.targets)
    train_idx, val_idx = split_indices(targets, min(cfg.val_size, len(targets)), cfg.split_seed)
    val = torch.utils.data.Subset(tvd.ImageFolder(str(root / "train"), plain), val_idx.tolist()) \
        if len(val_idx) else None
    return torch.utils.data.Subset(train, train_idx.tolist()), val, test


def _build_imagefolder(cfg, *, batch_size, eval_batch_size, seed, shard, device) -> Data:
    root = Path(os.path.expanduser(cfg.root))
    train_ds, val_ds, test_ds = _imagefolder_splits(cfg, root)
    if cfg.get("train_size"):
        keep = _subset(cfg.train_size, len(train_ds), cfg.split_seed, "dataset.train_size")
        train_ds = torch.utils.data.Subset(train_ds, keep.tolist())
    if cfg.get("test_size"):
        keep = _subset(cfg.test_size, len(test_ds), cfg.split_seed, "dataset.test_size")
        test_ds = torch.utils.data.Subset(test_ds, keep.tolist())
    if batch_size > len(train_ds):
        raise ConfigError(f"batch_size={batch_size} is larger than the training set ({len(train_ds)} images);"
                          " lower batch_size, dataset.val_size, or raise dataset.train_size")
    info = DatasetInfo("imagenet", 3, cfg.image_size, cfg.num_classes, len(train_ds), len(test_ds),
                       len(val_ds) if val_ds is not None else 0, source=str(root))
    rank, world_size = shard
    sampler = _EpochSampler(len(train_ds), seed, batch_size, shard)
    kw = dict(num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
              persistent_workers=cfg.num_workers > 0)

    def evaluation(ds):
        if world_size > 1:  # every W-th example, like TensorBatches
            ds = torch.utils.data.Subset(ds, list(range(rank, len(ds), world_size)))
        return _Loader(torch.utils.data.DataLoader(ds, eval_batch_size, shuffle=False, **kw), device)
    train = _Loader(torch.utils.data.DataLoader(train_ds, batch_size // world_size, sampler=sampler, drop_last=True,
                                                **kw), device, sampler)
    return Data(info, train, evaluation(val_ds) if val_ds is not None else None, evaluation(test_ds))
