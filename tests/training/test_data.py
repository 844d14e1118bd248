"""Data modules: the real Debian Fashion-MNIST files, a generated ImageNet-style folder, the synthetic set."""

import socket
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.fabric.utilities import suggested_max_num_workers
from omegaconf import OmegaConf
from PIL import Image

from sparsetrain.training.data import (
    FASHION_MNIST_FILES,
    EpochSeededSampler,
    FashionMNISTDataModule,
    ImageFolderDataModule,
    SyntheticDataModule,
    stage_fashion_mnist,
)
from tests.helpers import ROOT

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
CONF = ROOT / "conf"

needs_debian_files = pytest.mark.skipif(
    not all((DEBIAN_FASHION_MNIST / name).is_file() for name in FASHION_MNIST_FILES),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Data never comes from the network: any connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a data module tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def fashion_cache(tmp_path_factory):
    """One decompressed copy shared by the module's tests (decompressing takes about a second)."""
    return tmp_path_factory.mktemp("cache")


def first_batch(loader):
    return next(iter(loader))


# ----------------------------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------------------------


@needs_debian_files
def test_fashion_mnist_reads_debian_files(fashion_cache):
    data = FashionMNISTDataModule(subset=256, batch_size=64, num_workers=0, cache_dir=str(fashion_cache))
    data.setup("fit")
    assert (data.num_classes, data.channels, data.img_size) == (10, 1, 28)
    assert len(data.train_set) == 256
    assert len(data.val_set) == 10_000  # t10k serves as validation
    assert data.test_set is data.val_set

    images, labels = first_batch(data.train_dataloader())
    assert type(images) is torch.Tensor and images.shape == (64, 1, 28, 28) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 10
    assert len(data.train_dataloader()) == 4
    val_images, val_labels = first_batch(data.val_dataloader())
    assert val_images.shape == (64, 1, 28, 28)
    # Normalized with the training-set statistics: roughly zero mean over a batch.
    assert abs(val_images.mean().item()) < 0.5
    assert "256 train / 10000 val" in data.describe() and "t10k" in data.describe()


@needs_debian_files
def test_fashion_mnist_resized_to_three_channels(fashion_cache):
    data = FashionMNISTDataModule(
        subset=32, batch_size=16, num_workers=0, channels=3, img_size=32, cache_dir=str(fashion_cache)
    )
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        images, _ = first_batch(loader)
        assert images.shape == (16, 3, 32, 32)
        assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


@needs_debian_files
def test_fashion_mnist_augmentation_only_on_train_and_switchable(fashion_cache):
    augmented = FashionMNISTDataModule(subset=64, num_workers=0, batch_size=8, cache_dir=str(fashion_cache))
    plain = FashionMNISTDataModule(
        subset=64, num_workers=0, batch_size=8, augment=False, cache_dir=str(fashion_cache)
    )
    augmented.setup("fit")
    plain.setup("fit")
    torch.manual_seed(0)
    draws = [augmented.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])
    assert torch.equal(plain.train_set[0][0], plain.train_set[0][0])
    assert torch.equal(augmented.val_set[0][0], augmented.val_set[0][0])
    assert "augment off" in plain.describe()


@needs_debian_files
def test_calibration_batches_are_fixed_augmented_and_leave_the_global_rng_alone(fashion_cache):
    data = FashionMNISTDataModule(subset=64, num_workers=0, batch_size=8, cache_dir=str(fashion_cache))
    data.setup("fit")
    state = torch.get_rng_state()
    first = [x for x, _ in data.calibration_dataloader(3)]
    second = [x for x, _ in data.calibration_dataloader(3)]
    assert torch.equal(torch.get_rng_state(), state)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
    # augmented as in training, under its own seeds: not the plain images of the same indices
    plain = FashionMNISTDataModule(subset=64, num_workers=0, batch_size=8, augment=False, cache_dir=str(fashion_cache))
    plain.setup("fit")
    assert not torch.equal(torch.cat(first), torch.cat([x for x, _ in plain.calibration_dataloader(3)]))
    assert len(list(plain.calibration_dataloader(100))) == 8  # capped at the 64 training images


@needs_debian_files
def test_fashion_mnist_val_fraction_holds_out_part_of_train(fashion_cache):
    data = FashionMNISTDataModule(
        val_fraction=0.1, subset=500, num_workers=0, batch_size=50, cache_dir=str(fashion_cache)
    )
    data.setup("fit")
    assert len(data.val_set) == 6_000 and len(data.train_set) == 500 and len(data.test_set) == 10_000
    assert not set(data.val_set.indices) & set(data.train_set.indices)


@needs_debian_files
def test_fashion_mnist_staging_is_decompressed_once(fashion_cache):
    staged = stage_fashion_mnist(DEBIAN_FASHION_MNIST, fashion_cache)
    raw_images = staged / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    assert raw_images.stat().st_size == 28 * 28 * 60_000 + 16  # idx header + pixels
    inode = raw_images.stat().st_ino
    assert stage_fashion_mnist(DEBIAN_FASHION_MNIST, fashion_cache) == staged
    assert raw_images.stat().st_ino == inode


def test_fashion_mnist_missing_root_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist.*data.root") as error:
        FashionMNISTDataModule(root=str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value)
    assert "\n" not in str(error.value)


@needs_debian_files
def test_fashion_mnist_rejects_impossible_options(fashion_cache):
    with pytest.raises(ValueError, match="channels"):
        FashionMNISTDataModule(channels=2)
    with pytest.raises(ValueError, match="num_classes"):
        FashionMNISTDataModule(num_classes=100)
    with pytest.raises(ValueError, match="val_fraction"):
        FashionMNISTDataModule(val_fraction=1.0)
    too_big = FashionMNISTDataModule(subset=70_000, num_workers=0, cache_dir=str(fashion_cache))
    with pytest.raises(ValueError, match="data.subset=70000 exceeds"):
        too_big.setup("fit")


# ----------------------------------------------------------------------------------------------------------
# ImageFolder
# ----------------------------------------------------------------------------------------------------------


def write_images(folder: Path, count: int, seed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for index in range(count):
        pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"{index}.png")


@pytest.fixture
def image_folder(tmp_path):
    for class_index, class_name in enumerate(("cat", "dog", "emu")):
        write_images(tmp_path / "train" / class_name, count=4, seed=class_index)
        write_images(tmp_path / "val" / class_name, count=2, seed=10 + class_index)
    return tmp_path


def test_image_folder_loads_train_and_val(image_folder):
    data = ImageFolderDataModule(root=str(image_folder), num_classes=3, img_size=32, batch_size=4, num_workers=0)
    assert data.classes == ["cat", "dog", "emu"]
    data.setup("fit")
    assert len(data.train_set) == 12 and len(data.val_set) == 6
    images, labels = first_batch(data.train_dataloader())
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1, 2}
    val_images, val_labels = first_batch(data.val_dataloader())
    assert val_images.shape == (4, 3, 32, 32) and val_labels.tolist() == [0, 0, 1, 1]
    assert len(data.train_dataloader()) == 3  # 12 images, last partial batch dropped


def test_image_folder_subset(image_folder):
    data = ImageFolderDataModule(root=str(image_folder), num_classes=3, img_size=32, batch_size=4, subset=5,
                                 num_workers=0)
    data.setup("fit")
    assert len(data.train_set) == 5


def test_image_folder_missing_root_names_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/train is not a folder.*<root>/train/<class>"):
        ImageFolderDataModule(root=str(tmp_path / "nowhere"), num_classes=3)


def test_image_folder_without_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match="train has no class folders.*ImageNet layout"):
        ImageFolderDataModule(root=str(tmp_path), num_classes=3)


def test_image_folder_empty_class_folder_is_named(image_folder):
    (image_folder / "val" / "dog").rename(image_folder / "val" / "dog_moved")
    (image_folder / "val" / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"val/dog holds no images"):
        ImageFolderDataModule(root=str(image_folder), num_classes=3)


def test_image_folder_class_mismatch_between_splits(image_folder):
    write_images(image_folder / "train" / "fox", count=1, seed=99)
    with pytest.raises(ValueError, match=r"only in train: \['fox'\]"):
        ImageFolderDataModule(root=str(image_folder), num_classes=4)


def test_image_folder_num_classes_must_match(image_folder):
    with pytest.raises(ValueError, match="set data.num_classes=3"):
        ImageFolderDataModule(root=str(image_folder), num_classes=1000)


# ----------------------------------------------------------------------------------------------------------
# Synthetic
# ----------------------------------------------------------------------------------------------------------


def synthetic(**overrides) -> SyntheticDataModule:
    options = dict(num_classes=4, channels=3, img_size=8, train_size=64, val_size=32, batch_size=16, seed=0)
    data = SyntheticDataModule(**(options | overrides))
    data.setup("fit")
    return data


def all_samples(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = zip(*(dataset[index] for index in range(len(dataset))))
    return torch.stack(images), torch.tensor(labels)


def test_synthetic_is_deterministic():
    first, second, other_seed = synthetic(), synthetic(), synthetic(seed=1)
    for split in ("train_set", "val_set"):
        images, labels = all_samples(getattr(first, split))
        again_images, again_labels = all_samples(getattr(second, split))
        assert torch.equal(images, again_images) and torch.equal(labels, again_labels)
        assert not torch.equal(images, all_samples(getattr(other_seed, split))[0])
    assert not torch.equal(all_samples(first.train_set)[0][:32], all_samples(first.val_set)[0])
    batches = [first_batch(data.val_dataloader()) for data in (first, second)]
    assert torch.equal(batches[0][0], batches[1][0])


def test_synthetic_signal_is_learnable():
    data = synthetic(noise_std=1.0, val_size=256)
    images, labels = all_samples(data.val_set)
    prototypes = data.val_set.prototypes.flatten(1)
    nearest = torch.cdist(images.flatten(1), prototypes).argmin(dim=1)
    assert (nearest == labels).float().mean() > 0.95
    assert len(set(labels.tolist())) == 4


def test_synthetic_loader_shapes_and_describe():
    data = synthetic()
    images, labels = first_batch(data.train_dataloader())
    assert images.shape == (16, 3, 8, 8) and labels.shape == (16,)
    assert data.describe() == "synthetic: 64 train / 32 val, 4 classes, 3x8x8, batch 16, noise_std 1, seed 0"


def test_train_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match="lower data.batch_size"):
        synthetic(train_size=8, batch_size=16)


# ----------------------------------------------------------------------------------------------------------
# Shuffling and configs
# ----------------------------------------------------------------------------------------------------------


def test_epoch_seeded_sampler_depends_only_on_seed_and_epoch():
    sampler = EpochSeededSampler(100, seed=3)
    epoch0 = list(sampler)
    assert sorted(epoch0) == list(range(100)) and list(sampler) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    resumed = EpochSeededSampler(100, seed=3)
    resumed.set_epoch(1)
    assert list(resumed) == epoch1
    assert list(EpochSeededSampler(100, seed=4)) != epoch0


def test_train_loader_order_is_reproducible():
    orders = []
    for _ in range(2):
        loader = synthetic().train_dataloader()
        orders.append(torch.cat([labels for _, labels in loader]))
    assert torch.equal(orders[0], orders[1])


def compose(data_file: str, **data_overrides):
    data = OmegaConf.merge(OmegaConf.load(CONF / "data" / data_file), data_overrides)
    return OmegaConf.create({"seed": 0, "data": data})


def test_synthetic_yaml_instantiates():
    data = instantiate(compose("synthetic.yaml").data)
    assert isinstance(data, SyntheticDataModule)
    assert (data.num_classes, data.channels, data.img_size) == (10, 3, 32)


def test_image_folder_yaml_instantiates(image_folder):
    data = instantiate(compose("imagefolder.yaml", root=str(image_folder), num_classes=3).data)
    assert isinstance(data, ImageFolderDataModule) and data.img_size == 224


@needs_debian_files
def test_fashion_mnist_yaml_instantiates(fashion_cache):
    data = instantiate(compose("fashion_mnist.yaml", cache_dir=str(fashion_cache)).data)
    assert isinstance(data, FashionMNISTDataModule)
    assert (data.num_classes, data.channels, data.img_size, data.seed) == (10, 1, 28, 0)


def test_loaders_run_at_most_the_workers_the_machine_has_cores_for():
    def val_workers(num_workers):
        data = SyntheticDataModule(train_size=8, val_size=8, batch_size=4, img_size=8, channels=1,
                                   num_workers=num_workers)
        data.setup("fit")
        return data.val_dataloader().num_workers

    assert val_workers(10_000) == suggested_max_num_workers(1) < 10_000
    assert val_workers(1) == 1
    assert val_workers(0) == 0
