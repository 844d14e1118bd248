"""LightningDataModules for the training app, each built by `hydra.utils.instantiate(cfg.data)`.

- `FashionMNISTDataModule`: Debian's `dataset-fashion-mnist` files read through torchvision's `FashionMNIST`.
- `ImageFolderDataModule`: an ImageNet-style `train/<class>/` + `val/<class>/` folder.
- `SyntheticDataModule`: class prototypes plus noise, for smoke tests that must see accuracy rise.

Every module exposes `num_classes`, `channels`, `img_size` (the model is built from them) and `describe()`.

Exact resume: the training order of epoch `e` depends only on `(seed, e)` (and, under DDP, the rank); a
sample's augmentation depends only on `(seed, e, index)`, never on the global RNG or the worker count; and the
train loader is a `ResumableDataLoader`, whose position (epoch, batches trained) Lightning stores in every
checkpoint. A run resumed mid-epoch therefore skips exactly the batches already trained (their indices only:
nothing is loaded) and sees the same batches, in the same order and with the same augmentation, as a run that
never stopped.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric.utilities import suggested_max_num_workers
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from sparsetrain.cache import cache_dir as default_cache_dir

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Measured over the 60k Fashion-MNIST training images, pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_NATIVE_SIZE = 28
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# ImageNet evaluation resizes the short side to 256 for a 224 center crop; keep that ratio at any size.
EVAL_CROP_FRACTION = 224 / 256
# Independent random streams of one seed: synthetic prototypes, train and val samples, augmentation, and the
# BatchNorm calibration batches (which images, and their augmentation).
PROTOTYPE_STREAM, TRAIN_STREAM, VAL_STREAM, AUGMENT_STREAM, CALIBRATION_STREAM = 0, 1, 2, 3, 4


log = logging.getLogger("sparsetrain")


def _world() -> tuple[int, int]:
    """(number of ranks, this rank): (1, 0) outside an initialized process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class EpochSeededSampler(DistributedSampler):
    """This rank's share of a random permutation drawn from `seed + epoch` alone.

    A generator seeded once and advanced every epoch would restart from the seed after a resume and replay
    epoch 0's order; this one gives epoch e the same order however the run got there. Lightning calls
    `set_epoch` before every training epoch. It is a DistributedSampler (one rank: the whole permutation;
    under DDP: every world_size-th index, the permutation padded to a multiple of world_size), so Lightning
    uses it as is instead of wrapping it in one whose inner order never changes with the epoch.

    `skip(epoch, samples)` leaves out the first `samples` of this rank's share the next time epoch `epoch` is
    iterated (a mid-epoch resume). With `tag_epoch`, it yields `(index, epoch)` pairs for `SeededAugmentation`.
    """

    def __init__(self, num_samples: int, seed: int, tag_epoch: bool = False) -> None:
        num_replicas, rank = _world()
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.tag_epoch = tag_epoch
        self._skip: tuple[int, int] | None = None

    def skip(self, epoch: int, samples: int) -> None:
        self._skip = (epoch, samples)

    def __iter__(self):
        indices = list(super().__iter__())
        if self._skip is not None:
            epoch, samples = self._skip
            self._skip = None
            if epoch == self.epoch:
                indices = indices[samples:]
        if self.tag_epoch:
            return iter([(index, self.epoch) for index in indices])
        return iter(indices)


class ResumableDataLoader(DataLoader):
    """A train DataLoader that Lightning can resume mid-epoch (it is `_Stateful`).

    Lightning stores `state_dict()` in each checkpoint (`loops.fit_loop.state_dict.combined_loader`) and hands
    it to `load_state_dict()` before the resumed epoch starts. The position is the number of batches whose
    training step finished in the current epoch, read from the attached trainer (`position`), so a checkpoint
    written mid-step (the non-finite stop) retries that batch, as Lightning's own loop state does; without a
    trainer it is the number of batches yielded. Only `EpochSeededSampler` can skip, so the loader needs one.

    Iteration is lazy: nothing (not even worker start-up) happens until the first batch is asked for, which is
    after Lightning's `set_epoch`; an iterator made earlier would read the sampler at the wrong epoch.
    """

    def __init__(self, *args, position=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochSeededSampler):
            raise TypeError("ResumableDataLoader needs an EpochSeededSampler (sampler=...), which can skip batches")
        self._position = position
        self._epoch: int | None = None
        self._yielded = 0

    def __iter__(self):
        return self._batches()

    def _batches(self):
        position = self._position() if self._position is not None else None
        if position is not None:
            # The trainer's epoch, not the one Lightning passed to set_epoch: after resuming from a checkpoint
            # written at the end of an epoch, Lightning 2.6 passes the next epoch's number.
            self.sampler.set_epoch(position[0])
        self._epoch = self.sampler.epoch
        self._yielded = self.sampler._skip[1] // self.batch_size if self._resumes_this_epoch() else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def _resumes_this_epoch(self) -> bool:
        return self.sampler._skip is not None and self.sampler._skip[0] == self.sampler.epoch

    def state_dict(self) -> dict:
        position = self._position() if self._position is not None else None
        epoch, batches = position if position is not None else (self._epoch, self._yielded)
        return {"epoch": epoch, "batches": int(batches), "batch_size": self.batch_size,
                "num_replicas": self.sampler.num_replicas}

    def load_state_dict(self, state: dict) -> None:
        if state.get("epoch") is None or not state.get("batches"):
            return
        # Samples all ranks had trained on, in permutation order (rank r holds positions r, r + W, ...).
        seen = state["batches"] * state["batch_size"] * state["num_replicas"]
        if (state["batch_size"], state["num_replicas"]) != (self.batch_size, self.sampler.num_replicas):
            log.warning(
                "resuming epoch %d with batch size %d on %d rank(s), but the checkpoint was written with %d on %d: "
                "the epoch continues after the first %d samples, not at an exact batch boundary",
                state["epoch"], self.batch_size, self.sampler.num_replicas, state["batch_size"],
                state["num_replicas"], seen)
        self.sampler.skip(int(state["epoch"]), seen // self.sampler.num_replicas)


def augmentation_seed(seed: int, epoch: int, index: int, stream: int = AUGMENT_STREAM) -> int:
    """The RNG seed for one sample's augmentation in one epoch (63 bits, hashed by numpy's SeedSequence)."""
    return int(np.random.SeedSequence([seed, stream, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class SeededAugmentation(Dataset):
    """Runs a dataset's random transforms under a seed drawn from (seed, epoch, index).

    Keys are `(index, epoch)` pairs from `EpochSeededSampler(tag_epoch=True)`: the augmentation of a sample then
    depends neither on the global RNG, nor on which worker loads it, nor on where a run was resumed. A plain
    integer key uses the global RNG, as the wrapped dataset would.
    """

    def __init__(self, dataset: Dataset, seed: int, stream: int = AUGMENT_STREAM) -> None:
        self.dataset = dataset
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augmentation_seed(self.seed, epoch, index, self.stream))
            return self.dataset[index]


class _ImageClassificationDataModule(LightningDataModule):
    """Loaders, seeding and `describe()` shared by the data modules.

    A subclass sets `name`, implements `_build_datasets() -> (train, val)` and `_details() -> list[str]`.
    """

    name: str
    # Random train transforms (subclasses set it per instance); they run under SeededAugmentation.
    augment: bool = False

    def __init__(
        self, *, num_classes: int, channels: int, img_size: int, batch_size: int, num_workers: int, seed: int
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.channels = channels
        self.img_size = img_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._resume_position: dict | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_set, self.val_set = self._build_datasets()
        # The train loader drops the last partial batch (a batch of one breaks BatchNorm), so a smaller
        # train set would yield no batch at all and Lightning would silently skip training.
        if len(self.train_set) < self.batch_size:
            raise ValueError(
                f"{self.name}: {len(self.train_set)} training images cannot fill one batch of {self.batch_size}; "
                f"lower data.batch_size or use more training data"
            )

    def train_dataloader(self) -> DataLoader:
        dataset = SeededAugmentation(self.train_set, self.seed) if self.augment else self.train_set
        sampler = EpochSeededSampler(len(dataset), self.seed, tag_epoch=self.augment)
        self._train_loader = self._loader(dataset, sampler=sampler, drop_last=True, resumable=True)
        if self._resume_position is not None:
            self._train_loader.load_state_dict(self._resume_position)
        return self._train_loader

    # The train loader's position also travels in the datamodule's checkpoint entry. Lightning's own route
    # (loops.fit_loop.state_dict.combined_loader, handed to the loader's load_state_dict) is skipped when
    # configure_optimizers reads trainer.estimated_stepping_batches: that builds the loader before the loop
    # state is restored. The datamodule's state is restored before that, so the loader gets it on creation.
    def state_dict(self) -> dict:
        return {"train_loader": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_position = state_dict.get("train_loader")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)

    def calibration_dataloader(self, num_batches: int) -> DataLoader:
        """The same `num_batches` training batches at every call (fewer if the training set is smaller): a
        seeded choice of images, augmented as in training under seeds of their own. Neither the choice nor
        the loader's workers draw from the global RNG, so using it leaves a run's training draws unchanged."""
        count = min(num_batches * self.batch_size, len(self.train_set))
        order = sample_rng(self.seed, CALIBRATION_STREAM, 0).permutation(len(self.train_set))[:count].tolist()
        if self.augment:
            dataset, keys = SeededAugmentation(self.train_set, self.seed, CALIBRATION_STREAM), [(i, 0) for i in order]
        else:
            dataset, keys = self.train_set, order
        return self._loader(dataset, sampler=keys)

    def describe(self) -> str:
        if self.train_set is None:
            sizes = "not set up yet"
        else:
            sizes = f"{len(self.train_set)} train / {len(self.val_set)} val"
        facts = [
            sizes,
            f"{self.num_classes} classes",
            f"{self.channels}x{self.img_size}x{self.img_size}",
            f"batch {self.batch_size}",
            *self._details(),
        ]
        return f"{self.name}: " + ", ".join(facts)

    def _loader(
        self, dataset: Dataset, sampler: Sampler | None = None, drop_last: bool = False, resumable: bool = False
    ) -> DataLoader:
        workers = self.loader_workers()
        kwargs = dict(
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            # Worker seeds come from this generator, not the global RNG, so starting an iterator (every epoch,
            # every validation) draws nothing from the RNG that dropout uses: a resumed run's draws line up.
            generator=torch.Generator().manual_seed(self.seed),
        )
        if resumable:
            return ResumableDataLoader(dataset, position=self._train_position, **kwargs)
        return DataLoader(dataset, **kwargs)

    def loader_workers(self) -> int:
        """`num_workers`, capped at what the machine has: the cores this process may use, shared among the devices
        of the node, less one per device for the process that trains (more workers only queue for a core)."""
        devices = self.trainer.num_devices if self.trainer is not None else 1
        return min(self.num_workers, suggested_max_num_workers(devices))

    def _train_position(self) -> tuple[int, int] | None:
        """(epoch, batches whose training step finished in it) of the attached trainer's fit, else None."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def _seeded_permutation(self, num_samples: int) -> list[int]:
        return torch.randperm(num_samples, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def _take_subset(self, dataset: Dataset, indices: Sequence[int], subset: int | None) -> Dataset:
        """The first `subset` of `indices` (all of them when subset is None); `indices` is already shuffled."""
        if subset is not None:
            if subset > len(indices):
                raise ValueError(
                    f"{self.name}: data.subset={subset} exceeds the {len(indices)} training images available; "
                    f"lower data.subset or set it to null"
                )
            indices = indices[:subset]
        if len(indices) == len(dataset):
            return dataset
        return Subset(dataset, list(indices))


def _check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"data.{name}={value!r} is not supported; use one of {list(allowed)}")


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------


def check_fashion_mnist_files(root: Path) -> None:
    missing = [name for name in FASHION_MNIST_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files not found in {root} (missing {', '.join(missing)}); "
            f"apt-get install dataset-fashion-mnist, or set data.root=<folder holding the four .gz files>"
        )


def stage_fashion_mnist(root: Path, cache_dir: Path) -> Path:
    """Lay Debian's files out the way torchvision's FashionMNIST reads them and return the root to give it.

    torchvision reads the decompressed files from `<root>/FashionMNIST/raw/` (it only gunzips what it
    downloads itself), so the .gz files are decompressed once into the cache. The staging folder is keyed by
    the source folder, so two roots never share a copy.
    """
    check_fashion_mnist_files(root)
    source_key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    staging_root = cache_dir / "fashion-mnist" / source_key
    raw_folder = staging_root / "FashionMNIST" / "raw"
    raw_folder.mkdir(parents=True, exist_ok=True)
    for gz_name in FASHION_MNIST_FILES:
        _decompress_if_stale(root / gz_name, raw_folder / gz_name.removesuffix(".gz"))
    return staging_root


def _decompress_if_stale(source: Path, target: Path) -> None:
    # The copy carries the source's mtime, so a changed source is noticed and an unchanged one costs a stat.
    source_mtime = source.stat().st_mtime_ns
    if target.is_file() and target.stat().st_mtime_ns == source_mtime:
        return
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
    with gzip.open(source, "rb") as compressed, open(partial, "wb") as plain:
        shutil.copyfileobj(compressed, plain)
    os.utime(partial, ns=(source_mtime, source_mtime))
    # Atomic rename: DDP ranks staging at the same time never see half a file.
    os.replace(partial, target)


def fashion_mnist_transform(img_size: int, channels: int, augment: bool) -> v2.Compose:
    steps = []
    if img_size != FASHION_MNIST_NATIVE_SIZE:
        steps.append(v2.Resize((img_size, img_size), antialias=True))
    if augment:
        steps += [v2.RandomCrop(img_size, padding=max(1, img_size // 8)), v2.RandomHorizontalFlip()]
    if channels == 3:
        # Replicates the gray channel (no colour weighting happens on a 1-channel input).
        steps.append(v2.Grayscale(num_output_channels=3))
    steps += _to_normalized_tensor([FASHION_MNIST_MEAN] * channels, [FASHION_MNIST_STD] * channels)
    return v2.Compose(steps)


class FashionMNISTDataModule(_ImageClassificationDataModule):
    """Fashion-MNIST from Debian's `dataset-fashion-mnist` package, through torchvision's `FashionMNIST`.

    Train is the 60k training split. Validation is the 10k t10k *test* split, the usual Fashion-MNIST
    practice; with `val_fraction > 0` a seeded fraction of the training split is held out as validation
    instead.
    """

    name = "fashion_mnist"

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        num_classes: int = 10,
        channels: int = 1,
        img_size: int = FASHION_MNIST_NATIVE_SIZE,
        batch_size: int = 128,
        num_workers: int = 4,
        augment: bool = True,
        subset: int | None = None,
        val_fraction: float = 0.0,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        _check_choice("num_classes", num_classes, (10,))
        _check_choice("channels", channels, (1, 3))
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={val_fraction} must be in [0, 1); 0 validates on t10k")
        super().__init__(
            num_classes=num_classes,
            channels=channels,
            img_size=img_size,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.root = Path(root).expanduser()
        check_fashion_mnist_files(self.root)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.augment = augment
        self.subset = subset
        self.val_fraction = val_fraction
        self.test_set: Dataset | None = None

    def prepare_data(self) -> None:
        stage_fashion_mnist(self.root, self.cache_dir)

    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        # Also staged here (a no-op after prepare_data) so that setup() works without a Trainer.
        staged_root = stage_fashion_mnist(self.root, self.cache_dir)
        eval_transform = fashion_mnist_transform(self.img_size, self.channels, augment=False)
        train_transform = fashion_mnist_transform(self.img_size, self.channels, augment=self.augment)

        def split(train: bool, transform: v2.Compose) -> Dataset:
            return datasets.FashionMNIST(staged_root, train=train, transform=transform, download=False)

        self.test_set = split(train=False, transform=eval_transform)
        train_split = split(train=True, transform=train_transform)
        order = self._seeded_permutation(len(train_split))
        num_held_out = round(self.val_fraction * len(train_split))
        if num_held_out:
            # The same images without augmentation, so validation is deterministic.
            val_set = Subset(split(train=True, transform=eval_transform), order[:num_held_out])
        else:
            val_set = self.test_set
        train_set = self._take_subset(train_split, order[num_held_out:], self.subset)
        return train_set, val_set

    def _details(self) -> list[str]:
        validation = f"val = {self.val_fraction:g} of train" if self.val_fraction else "val = t10k test split"
        return [validation, f"augment {'on' if self.augment else 'off'}"]


# ----------------------------------------------------------------------------------------------------------
# ImageNet-style folder
# ----------------------------------------------------------------------------------------------------------

IMAGE_FOLDER_LAYOUT = "expected <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg (ImageNet layout)"


def find_image_folder_classes(split_folder: Path) -> list[str]:
    """Class folder names of one split, after checking each holds at least one image."""
    if not split_folder.is_dir():
        raise FileNotFoundError(f"{split_folder} is not a folder; {IMAGE_FOLDER_LAYOUT}; set data.root=...")
    classes = sorted(entry.name for entry in os.scandir(split_folder) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(f"{split_folder} has no class folders; {IMAGE_FOLDER_LAYOUT}")
    for class_name in classes:
        class_folder = split_folder / class_name
        # ImageFolder finds images at any depth, so look the same way; `any` stops at the first image.
        if not any(path.suffix.lower() in IMG_EXTENSIONS for path in class_folder.rglob("*")):
            raise FileNotFoundError(
                f"{class_folder} holds no images ({', '.join(IMG_EXTENSIONS)}); {IMAGE_FOLDER_LAYOUT}"
            )
    return classes


def imagenet_train_transform(img_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(img_size, antialias=True),
            v2.RandomHorizontalFlip(),
            *_to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def imagenet_eval_transform(img_size: int) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(round(img_size / EVAL_CROP_FRACTION), antialias=True),
            v2.CenterCrop(img_size),
            *_to_normalized_tensor(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class ImageFolderDataModule(_ImageClassificationDataModule):
    """An ImageNet-style folder read with torchvision's `ImageFolder`, images converted to RGB.

    The layout is checked when the module is built, so a wrong path fails before any model is created.
    Train and val must hold the same class folders, since labels are the sorted folder names of each split.
    """

    name = "imagefolder"

    def __init__(
        self,
        root: str,
        num_classes: int = 1000,
        channels: int = 3,
        img_size: int = 224,
        batch_size: int = 256,
        num_workers: int = 8,
        augment: bool = True,
        subset: int | None = None,
        seed: int = 0,
    ) -> None:
        _check_choice("channels", channels, (3,))
        super().__init__(
            num_classes=num_classes,
            channels=channels,
            img_size=img_size,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.root = Path(root).expanduser()
        self.augment = augment
        self.subset = subset
        self.classes = self._check_layout()

    def _check_layout(self) -> list[str]:
        train_classes = find_image_folder_classes(self.root / "train")
        val_classes = find_image_folder_classes(self.root / "val")
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise ValueError(
                f"{self.root}: train and val hold different class folders (only in train: {only_train}, "
                f"only in val: {only_val}); give both splits the same class folders"
            )
        if len(train_classes) != self.num_classes:
            raise ValueError(
                f"{self.root / 'train'} has {len(train_classes)} class folders but data.num_classes="
                f"{self.num_classes}; set data.num_classes={len(train_classes)}"
            )
        return train_classes

    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        if self.augment:
            train_transform = imagenet_train_transform(self.img_size)
        else:
            train_transform = imagenet_eval_transform(self.img_size)
        train_split = datasets.ImageFolder(self.root / "train", transform=train_transform)
        val_set = datasets.ImageFolder(self.root / "val", transform=imagenet_eval_transform(self.img_size))
        train_set = self._take_subset(train_split, self._seeded_permutation(len(train_split)), self.subset)
        return train_set, val_set

    def _details(self) -> list[str]:
        return [str(self.root), f"augment {'on' if self.augment else 'off'}"]


# ----------------------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------------------



def sample_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """An independent generator per (seed, stream, index).

    numpy's SeedSequence hashes all three words; torch.Generator would not do, as its CPU generator keeps
    only the low 32 bits of a seed. Always three words: SeedSequence pads short entropy with zeros, so
    [seed, 0] would equal [seed, 0, 0].
    """
    return np.random.default_rng([seed, stream, index])


class SyntheticImages(Dataset):
    """Image = prototype of its class + Gaussian noise; a linear model can learn it, so accuracy rises fast.

    Each sample draws its label and noise from its own generator, so a sample is the same whatever the
    access order or worker count, and the set costs no memory beyond the prototypes.
    """

    def __init__(self, prototypes: torch.Tensor, size: int, noise_std: float, seed: int, stream: int) -> None:
        self.prototypes = prototypes
        self.size = size
        self.noise_std = noise_std
        self.seed = seed
        self.stream = stream

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(f"sample {index} out of range for {self.size} synthetic images")
        rng = sample_rng(self.seed, self.stream, index)
        label = int(rng.integers(len(self.prototypes)))
        noise = torch.from_numpy(rng.standard_normal(self.prototypes.shape[1:], dtype=np.float32))
        return self.prototypes[label] + self.noise_std * noise, label


class SyntheticDataModule(_ImageClassificationDataModule):
    """Random images with a learnable class signal, fully determined by `seed`, for smoke tests."""

    name = "synthetic"

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        img_size: int = 32,
        train_size: int = 2048,
        val_size: int = 512,
        noise_std: float = 1.0,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        # Synthetic images have no random transforms; `augment` is accepted so that a recipe which sets
        # data.augment for its real dataset still runs with data=synthetic.
        super().__init__(
            num_classes=num_classes,
            channels=channels,
            img_size=img_size,
            batch_size=batch_size,
            num_workers=num_workers,
            seed=seed,
        )
        self.train_size = train_size
        self.val_size = val_size
        self.noise_std = noise_std

    def _build_datasets(self) -> tuple[Dataset, Dataset]:
        shape = (self.num_classes, self.channels, self.img_size, self.img_size)
        rng = sample_rng(self.seed, PROTOTYPE_STREAM, 0)
        prototypes = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))

        def split(size: int, stream: int) -> SyntheticImages:
            return SyntheticImages(prototypes, size, self.noise_std, self.seed, stream)

        return split(self.train_size, TRAIN_STREAM), split(self.val_size, VAL_STREAM)

    def _details(self) -> list[str]:
        return [f"noise_std {self.noise_std:g}", f"seed {self.seed}"]
