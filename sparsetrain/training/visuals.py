"""Pictures of weight masks, for wandb and the run directory: kept = dark, pruned = light.

Two views, because the two patterns live at different scales. A 2:4 mask only makes sense at one
pixel per weight, so "crop" shows the top-left corner unscaled. A block mask is about where whole
tiles were kept, so "whole" averages the full matrix down to fit; each pixel is then the kept
fraction of the weights it covers, and tiles stay sharp as long as they span several pixels.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal, Optional

import numpy as np

KEPT_GRAY = 20  # near black
PRUNED_GRAY = 240  # near white, so the page background still frames the picture
# In the crop view every other group of 4 columns has a slightly darker pruned shade, so the eye
# can find the 2:4 groups (two dark pixels in each band of four).
PRUNED_GRAY_ODD_GROUP = 205
# The saved PNG shows the mask at an integer zoom: any other scaling makes a 2:4 pattern beat
# against the screen pixels (moire), which looks like a pattern the mask does not have.
SAVED_LONG_SIDE_PX = 512
# A saved crop shows fewer weights than a logged image: at 8x zoom a viewer that shrinks the PNG
# still shows the 2:4 bands, which at 256 weights across turn into grey noise.
SAVED_SIDE = {"crop": 64, "whole": 256}
MIN_FIGURE_WIDTH_PX = 520
TITLE_BAND_PX = 44
CAPTION_BAND_PX = 48
MARGIN_PX = 12

View = Literal["crop", "whole"]


def mask_image(mask2d, max_side: int = 256, view: View = "crop") -> np.ndarray:
    """An RGB uint8 picture (H, W, 3) of a 2-D bool mask, no side longer than max_side.

    view="crop": the top-left max_side x max_side weights at 1 px each; pruned pixels alternate
    between two light shades every 4 columns to mark the 2:4 groups.
    view="whole": the whole matrix, block-averaged down by an integer factor (block structure visible).
    """
    _check_view(view)
    kept = _as_bool_matrix(mask2d)
    if max_side < 1:
        raise ValueError(f"max_side={max_side} must be at least 1 pixel")
    if view == "crop":
        crop = kept[:max_side, :max_side]
        pruned_gray = np.where(np.arange(crop.shape[1]) // 4 % 2, PRUNED_GRAY_ODD_GROUP, PRUNED_GRAY)
        gray = np.where(crop, KEPT_GRAY, pruned_gray[None, :])
    else:
        kept_fraction = _downsample_kept_fraction(kept, math.ceil(max(kept.shape) / max_side))
        gray = np.rint(PRUNED_GRAY + kept_fraction * (KEPT_GRAY - PRUNED_GRAY))
    return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)


def save_mask_png(mask2d, path, title: str, view: View = "crop", max_side: Optional[int] = None) -> Path:
    """Writes mask_image(...) as a PNG with a title and a caption that says what the pixels are.
    max_side defaults to 64 weights for "crop" and 256 pixels for "whole"."""
    _check_view(view)
    kept = _as_bool_matrix(mask2d)
    image = mask_image(kept, max_side=max_side or SAVED_SIDE[view], view=view)
    zoom = max(1, SAVED_LONG_SIDE_PX // max(image.shape[:2]))
    zoomed = image.repeat(zoom, axis=0).repeat(zoom, axis=1)
    caption = _caption(kept, image.shape[:2], view)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _draw_pixel_exact(zoomed, title, caption).savefig(path, dpi=100)
    return path


def _check_view(view) -> None:
    if view not in SAVED_SIDE:
        raise ValueError(f"view={view!r}: use 'crop' (1 px per weight) or 'whole' (downsampled matrix)")


def _as_bool_matrix(mask2d) -> np.ndarray:
    if hasattr(mask2d, "detach"):  # a torch tensor, possibly on the GPU
        mask2d = mask2d.detach().cpu().numpy()
    kept = np.asarray(mask2d).astype(bool)
    if kept.ndim != 2 or kept.size == 0:
        raise ValueError(f"expected a non-empty 2-D mask (out, in), got shape {tuple(kept.shape)}")
    return kept


def _downsample_kept_fraction(kept: np.ndarray, factor: int) -> np.ndarray:
    """Mean of each factor x factor cell; cells cut by the matrix edge average only what they cover."""
    rows, cols = kept.shape
    padded = np.full((math.ceil(rows / factor) * factor, math.ceil(cols / factor) * factor), np.nan)
    padded[:rows, :cols] = kept
    cells = padded.reshape(padded.shape[0] // factor, factor, padded.shape[1] // factor, factor)
    return np.nanmean(cells, axis=(1, 3))


def _caption(kept: np.ndarray, image_hw: tuple, view: View) -> str:
    rows, cols = kept.shape
    if view == "crop":
        shown = f"top-left {image_hw[0]}x{image_hw[1]} of {rows}x{cols} (out x in), 1 px per weight, bands of 4 columns"
    else:
        factor = math.ceil(max(rows, cols) / max(image_hw))
        shown = f"whole {rows}x{cols} (out x in), 1 px per {factor}x{factor} weights"
    return f"{shown}\ndark = kept, light = pruned; {kept.mean():.1%} of all weights kept"


def _draw_pixel_exact(image: np.ndarray, title: str, caption: str):
    # figimage puts array pixels on output pixels one to one; imshow in an Axes would resample.
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    fig_width = max(width + 2 * MARGIN_PX, MIN_FIGURE_WIDTH_PX)
    fig_height = height + TITLE_BAND_PX + CAPTION_BAND_PX
    fig = Figure(figsize=(fig_width / 100, fig_height / 100), dpi=100)
    fig.figimage(image, xo=(fig_width - width) // 2, yo=CAPTION_BAND_PX, origin="upper")
    fig.text(0.5, 1 - 12 / fig_height, title, ha="center", va="top", fontsize=12)
    fig.text(0.5, 6 / fig_height, caption, ha="center", va="bottom", fontsize=9, linespacing=1.4)
    return fig
