"""Image classification data for the tools: an ImageFolder root or the embedded default (scikit-learn digits).

The embedded default needs no download: scikit-learn ships 1,797 real 8x8 grey-level scans of handwritten digits
(UCI "optdigits"). They are upscaled to the requested size, converted to 3 channels and split (stratified, fixed
seed) into 1,438 training and 359 validation images.

Samplers:
- ``GlobalBatchSampler`` (a DistributedSampler): each global batch holds the same images whatever the number of
  processes or the gradient accumulation, and a run resumed mid-epoch restarts at a given batch of the same order.
- ``ShardedEvalSampler``: every validation image is seen exactly once across the ranks (no padding, no duplicates),
  so the top-1/top-5 counts summed over the ranks are exact.
"""
import os
from typing import Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler

from .cli import UsageError

__all__ = [
    'EmbeddedDigits', 'build_datasets', 'GlobalBatchSampler', 'ShardedEvalSampler', 'DIGITS_NAME',
    'keep_zero_bit_posterize',
]

DIGITS_NAME = 'embedded:digits'


class EmbeddedDigits(Dataset):
    """scikit-learn's handwritten digits as RGB PIL images of ``image_size`` pixels, split 'train' or 'val'."""

    num_classes = 10
    val_fraction = 0.2

    def __init__(self, split: str = 'train', image_size: int = 32, transform=None, split_seed: int = 0):
        from PIL import Image
        from sklearn.datasets import load_digits
        if split not in ('train', 'val'):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if image_size < 8:
            raise ValueError(f'image_size must be >= 8 (the digits are 8x8), got {image_size}')
        digits = load_digits()
        images, targets = digits.images, digits.target.astype(np.int64)
        rng = np.random.RandomState(split_seed)
        val_idx: List[int] = []
        for c in range(self.num_classes):  # stratified split: 20% of every class
            idx = np.flatnonzero(targets == c)
            idx = idx[rng.permutation(len(idx))]
            val_idx.extend(idx[:int(round(len(idx) * self.val_fraction))].tolist())
        is_val = np.zeros(len(targets), dtype=bool)
        is_val[val_idx] = True
        keep = np.flatnonzero(is_val if split == 'val' else ~is_val)
        # 0..16 grey levels -> 0..255; upscale once here so that crops and resizes act on a normal-sized image
        self.images = [
            Image.fromarray(np.round(images[i] * (255.0 / 16.0)).astype(np.uint8), mode='L')
            .resize((image_size, image_size), Image.BICUBIC).convert('RGB')
            for i in keep
        ]
        self.targets = targets[keep].tolist()
        self.classes = [str(c) for c in range(self.num_classes)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def build_datasets(data_dir: Optional[str], train_split: str, val_split: str, image_size: int,
                   train_transform=None, eval_transform=None, need_train: bool = True):
    """(train_dataset or None, val_dataset, num_classes, description)."""
    if not data_dir:
        train = EmbeddedDigits('train', image_size, transform=train_transform) if need_train else None
        val = EmbeddedDigits('val', image_size, transform=eval_transform)
        return train, val, EmbeddedDigits.num_classes, f'{DIGITS_NAME} (scikit-learn handwritten digits)'
    from timm.data import ImageDataset
    if not os.path.isdir(data_dir):
        raise UsageError(f'data directory not found: {data_dir}')
    roots = {}
    for split in ([train_split] if need_train else []) + [val_split]:
        root = os.path.join(data_dir, split)
        if not os.path.isdir(root):
            raise UsageError(f"data directory {data_dir} has no '{split}/' folder (expected an ImageFolder root "
                             f"with {train_split}/ and {val_split}/)")
        roots[split] = root
    try:
        train = ImageDataset(roots[train_split], transform=train_transform) if need_train else None
        val = ImageDataset(roots[val_split], transform=eval_transform)
    except (RuntimeError, FileNotFoundError) as e:
        raise UsageError(f'cannot read images under {data_dir}: {str(e).splitlines()[0]}') from e
    if train is not None and _class_names(train) != _class_names(val):
        raise UsageError(f"'{train_split}/' and '{val_split}/' under {data_dir} have different class folders")
    classes = _class_names(val)
    if not classes or len(val) == 0:
        raise UsageError(f"no images found under {roots[val_split]}")
    return train, val, len(classes), f'ImageFolder {data_dir}'


def _class_names(ds) -> List[str]:
    reader = getattr(ds, 'reader', None)
    class_to_idx = getattr(reader, 'class_to_idx', None) or {}
    return sorted(class_to_idx)


def keep_zero_bit_posterize() -> None:
    """Let timm's RandAugment posterize to 0 bits again.

    With the ``inc`` policies (``rand-m9-mstd0.5-inc1``, every recipe here) timm maps magnitude 10 to "keep 0 bits",
    which Pillow < 13 turned into a black image and Pillow >= 13 rejects with ValueError, killing the data loader.
    The replacement returns the black image, as before; other bit counts go to Pillow unchanged.
    """
    from PIL import Image, ImageOps
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **__):
        if bits_to_keep >= 8:
            return img
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return ImageOps.posterize(img, bits_to_keep)

    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if auto_augment.NAME_TO_OP.get(name) is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


class GlobalBatchSampler(DistributedSampler):
    """DistributedSampler whose rank slices are cut from consecutive global batches, and that can start mid-epoch.

    Epoch ``e`` permutes the dataset with ``seed + e`` (as DistributedSampler does), drops the last incomplete global
    batch, and gives rank ``r`` the ``r``-th slice of ``per_rank`` indices of every global batch. The images of global
    batch ``k`` are therefore the same for any number of processes and any gradient accumulation, and
    ``set_start_batch(k)`` resumes an interrupted epoch at batch ``k``.
    """

    def __init__(self, dataset, global_batch: int, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        if global_batch % num_replicas:
            raise ValueError(f'global batch {global_batch} is not divisible by {num_replicas} processes')
        self.global_batch = global_batch
        self.per_rank = global_batch // num_replicas
        self.batches_per_epoch = len(dataset) // global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(f'dataset of {len(dataset)} images is smaller than one global batch of {global_batch}')
        self.start_batch = 0

    def set_start_batch(self, batch: int) -> None:
        if not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(f'start batch must be in [0, {self.batches_per_epoch}], got {batch}')
        self.start_batch = batch

    def epoch_order(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            return torch.randperm(len(self.dataset), generator=g).tolist()
        return list(range(len(self.dataset)))

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(self.epoch)
        for k in range(self.start_batch, self.batches_per_epoch):
            lo = k * self.global_batch + self.rank * self.per_rank
            yield from order[lo:lo + self.per_rank]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.per_rank


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Rank ``r`` of ``n`` gets indices r, r+n, r+2n, ...: together the ranks see every image exactly once."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        self.indices = list(range(rank, len(dataset), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)
