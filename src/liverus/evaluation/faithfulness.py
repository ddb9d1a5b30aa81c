"""Are the maps faithful? Two checks.

* Against the model (what a map must show): deletion and insertion curves of every map (occlusion, Grad-CAM,
  spatial attention) against random maps of the same images (:func:`deletion_insertion_for_model`).
* Against experts' lesion masks (where a map points): pointing game, share of heatmap energy inside the lesion, and
  the lesion area that is its chance level (:func:`faithfulness_for_model`). A map can point away from the lesion
  and still be faithful, when the model's score does come from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from liverus.data import CaseCache, model_pixels, view_names
from liverus.engine.attribution import (
    OcclusionGrid,
    cell_order,
    deletion_insertion,
    image_channels,
    malignancy_log_odds,
    occlusion_maps,
)
from liverus.engine.forward import model_input
from liverus.engine.heatmaps import attention_heatmap, gradcam_heatmap, has_gradcam_layers
from liverus.models import load_model
from liverus.utils import STAGES

__all__ = [
    "faithfulness",
    "faithfulness_for_model",
    "pooled_faithfulness",
    "METHODS",
    "MAP_METHODS",
    "deletion_insertion_for_model",
    "summarize_deletion_insertion",
]

METHODS = ("gradcam", "attention")


def faithfulness(heatmaps: np.ndarray, lesions: np.ndarray) -> dict:
    """Agreement of heatmaps with lesion masks.

    Args:
        heatmaps: (N, H, W) in [0, 1].
        lesions: (N, H, W) binary masks; cases with an empty mask are ignored.

    Returns:
        ``pointing_game`` (share of heatmaps whose maximum lies inside the lesion), ``energy_inside`` (mean share of
        heatmap mass inside the lesion), ``lesion_area`` (mean lesion share of the image: the chance level of
        ``energy_inside`` for a flat heatmap) and ``n``.
    """
    hits, energy, area = [], [], []
    for h, m in zip(heatmaps, lesions, strict=True):
        m = m > 0
        if not m.any():
            continue
        peak = np.unravel_index(int(np.argmax(h)), h.shape)
        hits.append(bool(m[peak]))
        total = float(h.sum())
        energy.append(float(h[m].sum()) / total if total > 0 else 0.0)
        area.append(float(m.mean()))
    if not hits:
        return {"pointing_game": float("nan"), "energy_inside": float("nan"), "lesion_area": float("nan"), "n": 0}
    return {
        "pointing_game": float(np.mean(hits)),
        "energy_inside": float(np.mean(energy)),
        "lesion_area": float(np.mean(area)),
        "n": len(hits),
    }


@STAGES.timed("heatmap faithfulness")
def faithfulness_for_model(model_path: str | Path, cases: list, *, max_cases: int = 100, seed: int = 0) -> dict:
    """Grad-CAM (and spatial-attention, where the model has it) faithfulness on cases with lesion masks.

    Args:
        model_path: a run's ``model.pt``.
        cases: cases (only those with a lesion mask or polygon are used), e.g. the held-out fold.
        max_cases: a seeded random sample of at most this many cases keeps the cost bounded on a CPU.

    Returns:
        ``{"gradcam": faithfulness(...), "attention": faithfulness(...) or None}``.
    """
    model, card = load_model(model_path)
    try:
        model.gradcam_layers()
    except ValueError:  # a radiomics model has no heatmap to check
        return {"gradcam": None, "attention": None}
    usable = [c for c in cases if c.mask or c.polygon]
    if len(usable) > max_cases:
        idx = np.random.default_rng(seed).choice(len(usable), max_cases, replace=False)
        usable = [usable[i] for i in sorted(idx)]
    if not usable:
        return {"gradcam": faithfulness(np.zeros((0, 1, 1)), np.zeros((0, 1, 1))), "attention": None}
    cache = CaseCache(card.require_preprocess(model_path))
    cams, atts, masks = [], [], []
    # Four images per Grad-CAM pass: each map depends on its own image only, and on 2 cores four at a time is the
    # faster (the final recipe's model: 16 images in 4.6 s at four, 7.2 s at 16; peak memory 1.4 and 2.5 GB, now
    # that only the mapped backbone pass keeps its autograd graph; 17 GB at 16 when all twelve kept theirs).
    for start in range(0, len(usable), 4):
        arrs = np.stack([cache.get(c) for c in usable[start : start + 4]])
        x = model_input(torch.from_numpy(np.ascontiguousarray(model_pixels(arrs, cache.cfg.lesion_channel))), card)
        cams.append(gradcam_heatmap(model, x))
        if model.has_spatial_attention:
            atts.append(attention_heatmap(model, x))
        masks.append(arrs[:, 2])
    lesions = np.concatenate(masks)
    return {
        "gradcam": faithfulness(np.concatenate(cams), lesions),
        "attention": faithfulness(np.concatenate(atts), lesions) if atts else None,
    }


def pooled_faithfulness(parts: list[dict]) -> dict:
    """Case-weighted mean of several :func:`faithfulness_for_model` results (e.g. one per fold)."""
    out = {}
    for method in METHODS:
        rs = [p[method] for p in parts if p.get(method) and p[method]["n"]]
        if rs:
            n = sum(r["n"] for r in rs)
            out[method] = {
                k: float(sum(r[k] * r["n"] for r in rs) / n) for k in ("pointing_game", "energy_inside", "lesion_area")
            } | {"n": n}
    return out


MAP_METHODS = ("occlusion", "gradcam", "attention")


@STAGES.timed("map faithfulness (deletion / insertion)")
def deletion_insertion_for_model(
    model_path: str | Path,
    cases: list,
    *,
    max_cases: int = 40,
    seed: int = 0,
    cells: int = 8,
    steps: int = 8,
    random_maps: int = 3,
    all_views: bool = False,
) -> dict:
    """Deletion and insertion scores (:func:`~liverus.engine.attribution.deletion_insertion`) of every map the model
    has, and of random maps, on ``cases``.

    Args:
        model_path: a ``model.pt``.
        cases: the cases to explain, e.g. a fold's held-out part (lesion models: those with a mask, polygon or box).
        max_cases: a seeded random sample of at most this many cases keeps the cost bounded (each case costs about
            150 model calls per view).
        cells: occlusion and deletion grid cells per side.
        steps: points of each curve after the first.
        random_maps: random cell orders per case that every method is compared with.
        all_views: also score the occlusion map of each further view (the whole scan) against random orders of its
            own cells; by default only the first view (the lesion crop, or the image), where every method has a map.

    Returns:
        ``{"cases": [per case: {method: {"deletion", "insertion"}}], "views": {view: [methods]}}``; summarise
        with :func:`summarize_deletion_insertion`.
    """
    model, card = load_model(model_path)
    model.eval()
    cfg = card.require_preprocess(model_path)
    lesion_model = cfg.crop == "roi" or cfg.lesion_channel
    usable = [c for c in cases if c.lesion_source != "none"] if lesion_model else list(cases)
    rng = np.random.default_rng(seed)
    if len(usable) > max_cases:
        usable = [usable[i] for i in sorted(rng.choice(len(usable), max_cases, replace=False))]
    cache = CaseCache(cfg)
    score = malignancy_log_odds(model, card)
    channels = image_channels(2 if cfg.lesion_channel else 1, card.views)
    grid = OcclusionGrid(cfg.image_size, cells)
    has_cam = has_gradcam_layers(model)
    first = ["occlusion"] + ["gradcam"] * has_cam + ["attention"] * bool(has_cam and model.has_spatial_attention)
    views = {"first": first}
    if all_views and len(channels) > 1:
        views[view_names(cfg.crop, cfg.scan_view)[1]] = ["occlusion"]
    rows = []
    for case in usable:
        pixels = torch.from_numpy(np.ascontiguousarray(model_pixels(cache.get(case)[None], cfg.lesion_channel)))
        pixels = pixels.float() / 255.0
        row: dict = {}
        for v, (view, methods) in enumerate(views.items()):
            maps = {"occlusion": occlusion_maps(score, pixels, [channels[v]], cells=cells)[0, 0]}
            if "gradcam" in methods:
                maps["gradcam"] = gradcam_heatmap(model, model_input(pixels, card))[0]
            if "attention" in methods:
                maps["attention"] = attention_heatmap(model, model_input(pixels, card))[0]
            orders = [cell_order(maps[m], grid) for m in methods]
            orders += [cell_order(None, grid, rng) for _ in range(random_maps)]
            deletion, insertion, _ = deletion_insertion(score, pixels, channels[v], np.stack(orders), cells=cells,
                                                        steps=steps)  # fmt: skip
            names = [*methods, *["random"] * random_maps]
            for name in dict.fromkeys(names):
                pick = [i for i, n in enumerate(names) if n == name]
                row[f"{name} ({view})" if v else name] = {
                    "deletion": float(deletion[pick].mean()), "insertion": float(insertion[pick].mean())
                }  # fmt: skip
        rows.append(row)
    return {"cases": rows, "views": views}


def summarize_deletion_insertion(parts: list[dict], *, n_boot: int = 2000, seed: int = 0) -> dict:
    """Pool :func:`deletion_insertion_for_model` results (e.g. one per fold) into, per method, the mean deletion and
    insertion areas, their difference (insertion - deletion: higher is more faithful) and that difference's margin
    over the random maps of the same cases with a 95% bootstrap interval over cases. A map *beats random* when the
    interval's lower end is above 0.05 (five points of probability-area: a clear margin, not a tie)."""
    rows = [r for p in parts for r in p["cases"]]
    if not rows:
        return {}
    rng = np.random.default_rng(seed)
    out = {}
    for method in rows[0]:
        if method.startswith("random"):
            continue
        random_key = "random" + method[len(method.split(" (")[0]) :]
        d = np.array([r[method]["deletion"] for r in rows])
        i = np.array([r[method]["insertion"] for r in rows])
        rd = np.array([r[random_key]["deletion"] for r in rows])
        ri = np.array([r[random_key]["insertion"] for r in rows])
        margin = (i - d) - (ri - rd)
        boots = np.array([margin[rng.integers(0, len(margin), len(margin))].mean() for _ in range(n_boot)])
        low, high = np.percentile(boots, [2.5, 97.5])
        out[method] = {
            "n": len(rows), "deletion": float(d.mean()), "insertion": float(i.mean()), "score": float((i - d).mean()),
            "random_deletion": float(rd.mean()), "random_insertion": float(ri.mean()),
            "random_score": float((ri - rd).mean()), "margin_over_random": float(margin.mean()),
            "margin_ci95": [float(low), float(high)], "beats_random": bool(low > 0.05),
        }  # fmt: skip
    return out
