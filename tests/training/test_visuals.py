"""Mask pictures: kept weights dark, pruned light; 2:4 at 1 px per weight, blocks as whole tiles."""
import numpy as np
import pytest
import torch
from matplotlib import image as mpimg

from sparsetrain.sparse.block import expand_block_mask
from sparsetrain.sparse.masks import mask_24
from sparsetrain.training.visuals import (KEPT_GRAY, PRUNED_GRAY, PRUNED_GRAY_ODD_GROUP, mask_image,
                                          save_mask_png)


def block_checkerboard(rows, cols, block_size):
    """A block mask whose kept tiles alternate like a checkerboard."""
    tiles = (np.add.outer(np.arange(rows // block_size), np.arange(cols // block_size)) % 2 == 0)
    return expand_block_mask(torch.from_numpy(tiles), block_size).numpy()


def test_24_crop_shows_each_weight_as_one_pixel():
    mask = mask_24(torch.rand(32, 64, generator=torch.Generator().manual_seed(0)))

    image = mask_image(mask)

    assert image.shape == (32, 64, 3) and image.dtype == np.uint8
    gray = image[..., 0]
    band_shade = np.where(np.arange(64) // 4 % 2, PRUNED_GRAY_ODD_GROUP, PRUNED_GRAY)
    np.testing.assert_array_equal(gray, np.where(mask.numpy(), KEPT_GRAY, band_shade[None, :]))
    assert ((gray == KEPT_GRAY).reshape(32, 16, 4).sum(-1) == 2).all()  # two dark pixels in every group of 4


def test_crop_is_the_top_left_corner():
    mask = mask_24(torch.rand(300, 600, generator=torch.Generator().manual_seed(1)))

    image = mask_image(mask, max_side=256)

    assert image.shape == (256, 256, 3)
    np.testing.assert_array_equal(image[..., 0] == KEPT_GRAY, mask[:256, :256].numpy())


def test_whole_view_shows_blocks_as_uniform_tiles():
    mask = block_checkerboard(128, 256, block_size=32)

    image = mask_image(mask, max_side=64, view="whole")  # 4x4 weights per pixel, 8x8 pixels per block

    assert image.shape == (32, 64, 3)
    tiles = image[..., 0].reshape(4, 8, 8, 8).transpose(0, 2, 1, 3)
    expected = np.where(np.add.outer(np.arange(4), np.arange(8)) % 2 == 0, KEPT_GRAY, PRUNED_GRAY)
    np.testing.assert_array_equal(tiles.min(axis=(2, 3)), expected)
    np.testing.assert_array_equal(tiles.max(axis=(2, 3)), expected)


def test_whole_view_of_uneven_shape_averages_partial_cells():
    mask = np.ones((10, 7), dtype=bool)

    image = mask_image(mask, max_side=4, view="whole")  # factor 3: cells at the edges cover 1 row/column

    assert image.shape == (4, 3, 3)
    assert (image == KEPT_GRAY).all()


def test_save_mask_png_writes_a_readable_picture(tmp_path):
    mask = mask_24(torch.rand(768, 3072, generator=torch.Generator().manual_seed(2)))

    crop_png = save_mask_png(mask, tmp_path / "masks" / "fc1.png", "blocks.0.mlp.fc1 (2:4)")
    whole_png = save_mask_png(block_checkerboard(768, 3072, 64), tmp_path / "block.png", "block 64", view="whole")

    for path in (crop_png, whole_png):
        pixels = mpimg.imread(path)
        assert pixels.shape[1] >= 512 and pixels.shape[0] >= 200
        assert pixels[..., :3].var() > 0


@pytest.mark.parametrize("mask, kwargs", [
    (np.ones((2, 4, 4), dtype=bool), {}),
    (np.ones((0, 4), dtype=bool), {}),
    (np.ones((4, 4), dtype=bool), {"view": "zoomed"}),
    (np.ones((4, 4), dtype=bool), {"max_side": 0}),
])
def test_bad_input_is_a_value_error(mask, kwargs):
    with pytest.raises(ValueError):
        mask_image(mask, **kwargs)
