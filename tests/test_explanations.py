"""Maps faithful by construction (occlusion), their deletion / insertion check against random maps, and figures whose
labels can be read (no text box overlaps another or leaves the figure)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from liverus.engine.attribution import (
    OcclusionGrid,
    cell_order,
    deletion_insertion,
    hidden_images,
    image_channels,
    occlusion_maps,
)
from liverus.evaluation.faithfulness import summarize_deletion_insertion


def _textured(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 4, size, size) model pixels in [0, 1]: two views of noise, each followed by a mask channel that marks a
    different square in every image."""
    rng = np.random.default_rng(seed)
    pixels = torch.from_numpy(rng.uniform(0, 1, (n, 4, size, size)).astype(np.float32))
    pixels[:, [1, 3]] = 0
    for i in range(n):
        y, x = 4 * i, 16 - 4 * i
        pixels[i, 1, y : y + 8, x : x + 8] = 1  # where view 1's texture counts, towards malignant
        pixels[i, 3, 24:, 24:] = 1  # where view 2's texture counts, towards benign
    return pixels


def _texture_score(pixels: torch.Tensor) -> torch.Tensor:
    """Log-odds that grow with the texture (standard deviation) inside view 1's mask and fall with that inside
    view 2's: a model whose evidence lies where each image's own mask says."""

    def inside(image, mask):
        m = mask > 0.5
        n = m.sum(dim=(1, 2)).clamp_min(1)
        mean = (image * m).sum(dim=(1, 2)) / n
        return (((image - mean[:, None, None]) ** 2) * m).sum(dim=(1, 2)).div(n).sqrt()

    return 10 * inside(pixels[:, 0], pixels[:, 1]) - 6 * inside(pixels[:, 2], pixels[:, 3])


@pytest.mark.parametrize("per_eval", [1, 7])
def test_occlusion_finds_each_images_evidence_with_its_sign(per_eval):
    pixels = _textured()
    maps = occlusion_maps(_texture_score, pixels, image_channels(2, 2), cells=4, per_eval=per_eval)
    assert maps.shape == (3, 2, 32, 32)
    cells = OcclusionGrid(32, 4).cell_masks()

    def touching(mask: np.ndarray) -> np.ndarray:
        """The grid cells that hold some of ``mask``: a map's resolution is one cell."""
        return cells[[bool((c & mask).any()) for c in cells]].any(0)

    for i in range(3):
        first, second = maps[i]
        raised = pixels[i, 1].numpy() > 0.5
        # Hiding (blurring) the texture inside the mask lowers the first view's evidence: positive there, nothing
        # in the cells that hold none of it.
        assert first[raised].min() > 0.05 and np.abs(first[~touching(raised)]).max() < 1e-6
        lowered = pixels[i, 3].numpy() > 0.5
        assert second[lowered].max() < -0.05 and np.abs(second[~touching(lowered)]).max() < 1e-6
    # Each image's map is its own: the batching over hidden copies keeps the images apart.
    assert not np.allclose(maps[0, 0], maps[1, 0])


def test_hidden_patches_are_blurred_not_painted():
    pixels = _textured(n=1)[:, :1]
    hidden = hidden_images(pixels, 8)
    assert hidden.shape == pixels.shape
    assert abs(float(hidden.mean()) - float(pixels.mean())) < 0.02  # brightness kept
    assert float(hidden.std()) < 0.3 * float(pixels.std())  # texture gone


def test_grid_covers_every_pixel_and_refuses_tiny_windows():
    for size, cells in ((224, 8), (160, 7), (96, 8), (33, 4)):
        grid = OcclusionGrid(size, cells)
        masks = grid.cell_masks()
        assert masks.shape == (cells * cells, size, size) and masks.any(0).all()
    with pytest.raises(ValueError, match="under 4 pixels"):
        OcclusionGrid(20, 8)
    with pytest.raises(ValueError, match="2 to 32"):
        OcclusionGrid(224, 1)


def test_deletion_and_insertion_rank_a_faithful_map_above_random_and_a_reversed_one_below():
    pixels = _textured(n=1, size=64)
    pixels[0, 1] = 0
    pixels[0, 1, 8:40, 8:40] = 1  # a large region of evidence, so the curves have room
    grid = OcclusionGrid(64, 8)
    faithful = occlusion_maps(_texture_score, pixels, [0], cells=8)[0, 0]
    rng = np.random.default_rng(0)
    orders = np.stack([cell_order(faithful, grid), cell_order(-faithful, grid),
                       *[cell_order(None, grid, rng) for _ in range(5)]])  # fmt: skip
    deletion, insertion, p = deletion_insertion(_texture_score, pixels, 0, orders, cells=8, steps=8)
    assert p > 0.5
    assert deletion[0] < deletion[2:].mean() < deletion[1]
    assert insertion[0] > insertion[2:].mean() > insertion[1]
    assert ((deletion >= 0) & (deletion <= 1) & (insertion >= 0) & (insertion <= 1)).all()


def test_summary_says_which_maps_beat_random_by_a_clear_margin():
    rng = np.random.default_rng(0)

    def case(good: float) -> dict:
        noise = rng.normal(0, 0.02, 4)
        return {
            "occlusion": {"deletion": 0.3 + noise[0], "insertion": 0.3 + good + noise[1]},
            "gradcam": {"deletion": 0.5 + noise[2], "insertion": 0.5 + noise[3]},
            "random": {"deletion": 0.5, "insertion": 0.5},
        }

    summary = summarize_deletion_insertion([{"cases": [case(0.4) for _ in range(20)]}, {"cases": [case(0.3)] * 5}])
    assert summary["occlusion"]["n"] == 25 and summary["occlusion"]["beats_random"]
    assert summary["occlusion"]["margin_over_random"] == pytest.approx((20 * 0.4 + 5 * 0.3) / 25, abs=0.01)
    low, _ = summary["gradcam"]["margin_ci95"]
    assert not summary["gradcam"]["beats_random"] and low < 0.05
    assert abs(summary["gradcam"]["margin_over_random"]) < 0.02
    assert set(summary) == {"occlusion", "gradcam"}


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of text boxes that a drawn figure shows overlapping, and texts that leave the figure. Only texts that
    are drawn count (a tick label outside the axis' range, or of an axis turned off, exists but is not drawn)."""
    from unittest import mock

    from matplotlib.text import Text

    drawn = []
    real = Text.draw

    def record(self, renderer):
        real(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self.get_text(), self.get_window_extent(renderer)))

    with mock.patch.object(Text, "draw", record):
        fig.canvas.draw()
    bad = [(a, b) for (a, ba), (b, bb) in itertools.combinations(drawn, 2) if ba.overlaps(bb)]
    frame = fig.bbox
    bad += [(t, "outside the figure") for t, b in drawn
            if b.x0 < frame.x0 - 1 or b.y0 < frame.y0 - 1 or b.x1 > frame.x1 + 1 or b.y1 > frame.y1 + 1]  # fmt: skip
    return bad


@pytest.mark.parametrize("shape", [(300, 400), (768, 1024), (600, 300)])
def test_figures_have_no_overlapping_labels(shape):
    import matplotlib.pyplot as plt

    from liverus.engine.contributions import contributions_plot
    from liverus.engine.heatmaps import attribution_plot, heatmap_plot

    rng = np.random.default_rng(0)
    crop = rng.integers(0, 255, (96, 96)).astype(np.uint8)
    original = rng.integers(0, 255, shape).astype(np.uint8)  # landscape, AUL's 1024x768, portrait
    lesion = np.zeros((96, 96), bool)
    lesion[30:60, 30:60] = True
    figures = {
        "Grad-CAM, two panels, with a note": heatmap_plot(
            crop, rng.uniform(0, 1, (96, 96)), probability=0.934, original_u8=original, box=(100, 80, 220, 200),
            lesion_source="user box + predicted mask, averaged over 4 boxes",
            note="Grad-CAM of the frozen backbone only: not faithful to this model's score (the default occlusion "
            "map is)",
        ),
        "Grad-CAM, one panel": heatmap_plot(crop, rng.uniform(0, 1, (96, 96)), probability=0.2),
        "occlusion, two views and the original": attribution_plot(
            [("lesion crop", crop, rng.normal(0, 0.3, (96, 96))), ("whole scan", crop, rng.normal(0, 0.3, (96, 96)))],
            probability=0.934, lesion=lesion, original_u8=original, box=(100, 80, 220, 200),
            lesion_source="user box + predicted mask, averaged over 4 boxes",
            note="The maps of views after the first did not beat random maps by a clear margin on AUL "
            "(docs/explanation.md): read them with care",
        ),
        "occlusion, the lesion crop and the original": attribution_plot(
            [("lesion crop", crop, rng.normal(0, 0.3, (96, 96)))], probability=0.934, lesion=lesion,
            original_u8=original, box=(100, 80, 220, 200), lesion_source="user box, averaged over 4 boxes",
        ),
        "contributions with the training lesions": contributions_plot(
            {"texture": 0.81, "deep: whole scan": -0.62, "shape and margin": 0.4, "echo pattern": -0.2,
             "halo and posterior acoustics": 0.05, "deep: lesion crop": 0.01},
            probability=0.934, baseline_probability=0.52,
            context={g: {"benign": [-0.6, -0.3, 0.0], "malignant": [0.0, 0.3, 0.7]}
                     for g in ("texture", "deep: whole scan", "shape and margin", "echo pattern",
                               "halo and posterior acoustics", "deep: lesion crop")},
        ),
        "contributions, radiomics only, no context": contributions_plot(
            {"shape and margin": 0.3, "echo pattern": -0.1, "texture": 0.2, "halo and posterior acoustics": 0.0},
            probability=0.6, baseline_probability=0.5,
        ),
    }  # fmt: skip
    for name, fig in figures.items():
        assert _overlaps(fig) == [], name
        plt.close(fig)


def test_the_overlap_check_catches_overlapping_labels():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.set_title("a title that is far too long to fit beside anything else in this small figure", fontsize=10)
    ax.text(0.5, 1.02, "a label drawn into the title", transform=ax.transAxes, ha="center")
    assert _overlaps(fig)
    plt.close(fig)
    # The figure liverus drew before this check: the right panel's title ran out of the figure with a long lesion
    # source (and into the colour bar's label).
    fig, (left, right) = plt.subplots(1, 2, figsize=(9.2, 4.4), dpi=100)
    right.set_title("original image, analysed region outlined (lesion: user box + predicted mask, averaged over 4 "
                    "boxes)", fontsize=9)  # fmt: skip
    assert _overlaps(fig)
    plt.close(fig)
