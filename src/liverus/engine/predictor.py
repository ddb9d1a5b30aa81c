"""One predictor for ``predict``, ``serve`` and ``explain``: a trained model (``model.pt``) or its ONNX export, with
the :class:`~liverus.models.ModelCard` stored beside the weights, so deployment applies exactly what training
validated.

The predictor prepares the pixels (preprocessing, the lesion, the boxes averaged) and hands them to a runner: an
:class:`~liverus.engine.onnx_runner.OnnxRunner` for an ``.onnx`` export, a
:class:`~liverus.engine.torch_runner.TorchRunner` for a ``model.pt``. This module imports no PyTorch, nor does the
ONNX runner: ``liverus predict`` and ``liverus serve`` of an export run in an install without it (docs/deployment.md,
"Without PyTorch"). What needs the PyTorch model (maps, contributions, the segmenter) imports it where it runs.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from liverus.data.preprocess import (
    PreprocessConfig,
    Preprocessed,
    box_to_mask,
    box_variants,
    model_pixels,
    preprocess,
    view_names,
)
from liverus.engine.averaging import average_probabilities
from liverus.engine.heatmaps import attribution_figure, heatmap_figure
from liverus.engine.onnx_runner import ONNX_METADATA_KEY, OnnxRunner
from liverus.models.card import DEFAULT_CLASSES, ModelCard
from liverus.utils import require_torch

if TYPE_CHECKING:
    import torch

    from liverus.engine.contributions import Contributions
    from liverus.engine.segment import LesionProposal
    from liverus.engine.torch_runner import TorchRunner

__all__ = ["Predictor", "Prediction", "ONNX_METADATA_KEY"]


@dataclass
class Prediction:
    probability: float  # of malignancy
    label: str
    threshold: float  # nan for a three-class model (its label is the most probable class)
    preprocessed: Preprocessed
    class_probabilities: dict[str, float] | None = None  # every class's, for a three-class model


class Predictor:
    """Loads a model once and predicts the probability of malignancy for gray images.

    Use :meth:`from_path` with a ``model.pt`` written by the trainer or an ``.onnx`` file written by
    ``liverus export``. Calls are serialised with a lock, so one predictor can serve concurrent requests.

    Args:
        card: the model card.
        runner: what computes the class probabilities of prepared pixels (:class:`~.onnx_runner.OnnxRunner` or
            :class:`~.torch_runner.TorchRunner`).
        segmenter: ``(model, card)`` of a lesion segmenter, or None.

    Raises:
        ValueError: for a model that is neither binary nor three-class (normal / benign / malignant), or carries no
            preprocessing settings.
    """

    def __init__(
        self,
        *,
        card: ModelCard,
        runner: OnnxRunner | TorchRunner,
        segmenter: tuple[torch.nn.Module, ModelCard] | None = None,
    ) -> None:
        self.runner = runner
        self.card = card
        # (model, card) of a lesion segmenter: proposes the lesion where none is given, and the mask inside a box.
        self.segmenter = segmenter
        self.preprocess_cfg: PreprocessConfig = card.require_preprocess(card.model_name)
        self._lock = threading.Lock()
        if not card.is_binary and tuple(card.classes) != DEFAULT_CLASSES[3]:
            raise ValueError(
                f"prediction supports binary (benign / malignant) and three-class {DEFAULT_CLASSES[3]} models; "
                f"{card.model_name} has the classes {tuple(card.classes)}"
            )

    # The card's fields under the names the applications print.
    threshold = property(lambda self: self.card.threshold)
    classes = property(lambda self: self.card.classes)
    name = property(lambda self: self.card.model_name)
    version = property(lambda self: self.card.version)

    @classmethod
    def from_path(
        cls, path: str | Path, *, segmenter: str | Path | None = None, box_average: int | None = None
    ) -> Predictor:
        """Load ``model.pt`` or an exported ``.onnx`` (and optionally a lesion segmenter's ``model.pt``). An ``.onnx``
        export never imports PyTorch; a ``model.pt`` and a segmenter do.

        Args:
            path: the model.
            segmenter: a lesion segmenter's ``model.pt``, to find the lesion where none is given.
            box_average: average each probability from a box over this many boxes around it (None: as the model's
                card says, see :attr:`~liverus.data.preprocess.PreprocessConfig.box_average`).

        Raises:
            ValueError: if a file is not a liverus model, ONNX export or segmenter, or ``box_average`` is out of
                range.
            liverus.utils.PyTorchMissingError: for a ``model.pt`` or a segmenter where PyTorch is not installed,
                saying how to install it.
        """
        path = Path(path)
        if path.suffix.lower() == ".onnx":
            runner, card = OnnxRunner.load(path)
        else:
            require_torch(f"the PyTorch model {path}")
            from liverus.engine.torch_runner import TorchRunner

            runner, card = TorchRunner.load(path)
        card.require_preprocess(path)
        pred = cls(card=card, runner=runner)
        if segmenter is not None:
            require_torch(f"the lesion segmenter {segmenter} (--segmenter)")
            from liverus.models.segmentation import load_segmenter

            pred.segmenter = load_segmenter(segmenter)
        if box_average is not None:
            pred.preprocess_cfg = dataclasses.replace(pred.preprocess_cfg, box_average=box_average)
        return pred

    @property
    def backend(self) -> str:
        """``pytorch`` or ``onnxruntime``."""
        return self.runner.backend

    @property
    def model(self) -> torch.nn.Module | None:
        """The PyTorch model; None for an ONNX export."""
        return getattr(self.runner, "model", None)

    @property
    def session(self) -> Any:
        """The ONNX Runtime session of an export; None for a PyTorch model."""
        return getattr(self.runner, "session", None)

    def _torch(self, what: str) -> TorchRunner:
        """The PyTorch runner, for ``what`` needs the model's weights.

        Raises:
            ValueError: for an ONNX export, saying to use model.pt.
        """
        if self.runner.backend != "pytorch":
            raise ValueError(f"{what} need the PyTorch model (model.pt), not the ONNX export")
        return self.runner

    def propose_lesion(self, image: np.ndarray) -> LesionProposal:
        """The lesion the loaded segmenter finds in a gray float image (see :attr:`segmenter`)."""
        # The segmenter is a PyTorch model: its code is imported only where one was loaded.
        from liverus.engine.segment import propose_lesion

        if self.segmenter is None:
            raise ValueError("no lesion segmenter is loaded; give --segmenter SEG.pt")
        return propose_lesion(*self.segmenter, image)

    def prepare(
        self, image: np.ndarray, *, lesion: np.ndarray | None = None, box: tuple[float, ...] | None = None
    ) -> Preprocessed:
        """Preprocess a gray float image as the model was trained.

        Raises:
            ValueError: for a lesion model (ROI crop or mask channel) given neither a lesion mask nor a box, saying
                how to give one.
        """
        cfg = self.preprocess_cfg
        given = lesion is not None and lesion.any()
        source = "user mask" if given else "user box" if box is not None else ""
        # The segmenter runs only where its answer is used: no lesion given, or a box whose mask the model reads.
        if self.needs_lesion and not given and self.segmenter is not None and (box is None or cfg.lesion_channel):
            proposal = self.propose_lesion(image)
            if box is None:
                if proposal.box is None:
                    raise ValueError(f"the segmenter found no lesion; {self.lesion_hint}")
                box, lesion, source = proposal.box, proposal.mask, "predicted"
            elif cfg.lesion_channel:
                inside = box_to_mask(np.zeros(image.shape, np.uint8), box, "box") & proposal.mask
                box_area = (box[2] - box[0]) * (box[3] - box[1])
                if inside.sum() >= 0.1 * box_area:  # else preprocess falls back to the box's own mask
                    lesion, source = inside, "user box + predicted mask"
        if self.needs_lesion and box is None and not given:
            raise ValueError(self.lesion_hint)
        outlined = lesion is not None and lesion.any()  # given, or predicted inside the box: nothing to average
        boxes = box_variants(cfg, from_box=self.needs_lesion and box is not None and not outlined)
        if len(boxes) == 1:
            pre = preprocess(image, cfg, lesion=lesion, box=box)
        else:
            # GrabCut dominates each box's preprocessing (0.7 s for a large lesion) and OpenCV releases the GIL:
            # the boxes run side by side. Each seeds OpenCV's generator on its own thread, so answers do not change.
            with ThreadPoolExecutor(max_workers=min(len(boxes), os.cpu_count() or 1)) as pool:
                pre, *others = pool.map(lambda c: preprocess(image, c, box=box), boxes)
            pre.variants = tuple(others)
            source += f", averaged over {cfg.box_average} boxes"
        pre.lesion_source = source if self.needs_lesion else ""
        return pre

    @property
    def has_heatmaps(self) -> bool:
        """Whether Grad-CAM heatmaps exist: a PyTorch model with a convolutional layer to look at (not an ONNX
        export, not a radiomics-only model)."""
        return self.backend == "pytorch" and self.runner.has_gradcam

    @property
    def has_contributions(self) -> bool:
        """Whether the decision splits into lesion-feature groups: the PyTorch model of a feature model."""
        return self.backend == "pytorch" and self.runner.has_feature_groups

    def contributions(self, pre: list[Preprocessed]) -> Contributions:
        """Each feature group's Shapley contribution to the log-odds of malignancy (:mod:`..contributions`).

        Raises:
            ValueError: for ONNX exports and for CNNs, saying what to use instead.
        """
        runner = self._torch("feature contributions")
        expanded, owner = _with_variants(pre)
        pixels = self._pixels(expanded)
        with self._lock:
            per_input = runner.contributions(pixels)

        # Shapley values are linear in the game: those of the mean log-odds over a case's boxes are their mean.
        def per_case(a: np.ndarray) -> np.ndarray:
            return np.stack([a[owner == i].mean(0) for i in range(len(pre))])

        return dataclasses.replace(
            per_input, values=per_case(per_input.values), baseline=per_case(per_input.baseline),
            logit=per_case(per_input.logit),
        )  # fmt: skip

    def contributions_chart(self, pre: Preprocessed, probability: float) -> tuple[Contributions, np.ndarray]:
        """One image's :meth:`contributions` and their chart (with where the training lesions of each class put
        each group, when the model keeps them), as ``predict``, ``explain`` and the page show it."""
        found = self.contributions([pre])
        # Imported once contributions() has found the PyTorch model: the module imports torch.
        from liverus.engine.contributions import contributions_figure

        chart = contributions_figure(
            found.as_dicts()[0], probability=probability, baseline_probability=float(found.baseline_probability[0]),
            context=found.training_context(),
        )  # fmt: skip
        return found, chart

    @property
    def needs_lesion(self) -> bool:
        """Whether the model analyses the lesion, so every image needs its mask or box."""
        return self.preprocess_cfg.crop == "roi" or self.preprocess_cfg.lesion_channel

    @property
    def lesion_hint(self) -> str:
        return (
            f"model {self.name} analyses the lesion and needs to know where it is: give --mask MASK or "
            "--box x0,y0,x1,y1 (pixels) for one image, a manifest CSV with a path column and a mask or box "
            "column for many, or --segmenter SEG.pt to have the lesion found (the web page asks for a box)"
        )

    def _pixels(self, pre: list[Preprocessed]) -> np.ndarray:
        return model_pixels(np.stack([p.stacked() for p in pre]), self.preprocess_cfg.lesion_channel)

    @property
    def is_three_class(self) -> bool:
        """Whether the model answers normal / benign / malignant (its label is then the most probable class)."""
        return not self.card.is_binary

    def probabilities(self, pre: list[Preprocessed]) -> np.ndarray:
        """Returns: malignancy probabilities for preprocessed images, each averaged over its boxes
        (:attr:`Preprocessed.variants`) where it has them."""
        return self.class_probabilities(pre)[:, -1]

    def class_probabilities(self, pre: list[Preprocessed]) -> np.ndarray:
        """Returns: (N, classes) probabilities of every class (the card's order; malignant last) for preprocessed
        images, each averaged over its boxes where it has them (their mean log-probability)."""
        expanded, owner = _with_variants(pre)
        pixels = self._pixels(expanded)
        with self._lock:
            probs = self.runner.class_probabilities(pixels)
        return _per_case_classes(probs, owner, len(pre))

    def label_of(self, class_probabilities: np.ndarray) -> str:
        """The label of one case's class probabilities: at the stored threshold for a binary model, the most
        probable class for a three-class one."""
        if self.is_three_class:
            return self.card.classes[int(np.argmax(class_probabilities))]
        return self.card.label(float(class_probabilities[-1]))

    def member_range(self, pre: list[Preprocessed]) -> np.ndarray | None:
        """For an ensemble (the recommended model: its five fold models), the lowest and highest of the members'
        probabilities of malignancy for each image (each averaged over the image's boxes as the ensemble's is):
        how much the answer depends on which training lesions a member saw. Returns: (N, 2), or None for a single
        model or an ONNX export."""
        if self.backend != "pytorch":
            return None
        expanded, owner = _with_variants(pre)
        pixels = self._pixels(expanded)
        with self._lock:
            probs = self.runner.member_probabilities(pixels)  # (M, inputs, classes)
        if probs is None:
            return None
        per_case = np.stack([_per_case(m, owner, len(pre)) for m in probs])  # (M, N)
        return np.stack([per_case.min(0), per_case.max(0)], axis=1)

    def predict(self, images: list[np.ndarray], *, lesions=None, boxes=None) -> list[Prediction]:
        pre = [
            self.prepare(img, lesion=(lesions or [None] * len(images))[i], box=(boxes or [None] * len(images))[i])
            for i, img in enumerate(images)
        ]
        probs = self.class_probabilities(pre)
        return [
            Prediction(
                float(p[-1]),
                self.label_of(p),
                float("nan") if self.is_three_class else self.threshold,
                pp,
                dict(zip(self.card.classes, map(float, p), strict=True)) if self.is_three_class else None,
            )
            for p, pp in zip(probs, pre, strict=True)
        ]

    @property
    def methods(self) -> tuple[str, ...]:
        """The maps this model has: ``occlusion`` of the first view (any PyTorch model), ``occlusion_views`` of every
        view (two-view models: the lesion crop and the whole scan), ``gradcam`` (a convolutional layer to look at),
        ``attention`` (a spatial-attention module). None for an ONNX export."""
        if self.backend != "pytorch":
            return ()
        return (
            ("occlusion",)
            + ("occlusion_views",) * (self.card.views > 1)
            + ("gradcam",) * self.has_heatmaps
            + ("attention",) * bool(self.has_heatmaps and self.runner.has_spatial_attention)
        )

    @property
    def default_method(self) -> str | None:
        """The map shown unless another is asked for: one that beat random maps by a clear margin on AUL
        cross-validation (docs/explanation.md#faithfulness). For feature models that is occlusion of the lesion crop
        (their decision is mostly the radiomics, which Grad-CAM of the frozen backbone cannot see); for CNNs no map
        did, so none is shown by default and each is drawn on request with that said. None also for an ONNX
        export."""
        if self.backend != "pytorch" or not self.has_contributions and self.has_heatmaps:
            return None
        return "occlusion"

    def method_note(self, method: str) -> str:
        """What a map shown on request must say of itself: that it did not pass the faithfulness check."""
        if method == "gradcam" and self.has_contributions:
            return ("Grad-CAM of the frozen backbone only: not faithful to this model's score "
                    "(the default occlusion map is)")  # fmt: skip
        if method == "occlusion_views":
            return ("The maps of views after the first did not beat random maps by a clear margin on AUL "
                    "(docs/explanation.md): read them with care")  # fmt: skip
        if method != self.default_method:
            return ("Not verified: for CNNs no map beat random maps by a clear margin on AUL "
                    "(docs/explanation.md); read it with care")  # fmt: skip
        return ""

    def check_method(self, method: str) -> str:
        """``method``, or ``default`` resolved to :attr:`default_method`.

        Raises:
            ValueError: for a map this model does not have, naming those it has.
        """
        have = ", ".join(self.methods) or "none (ONNX exports carry no maps; use model.pt)"
        if method == "default" and self.default_method is None and self.methods:
            raise ValueError(
                f"model {self.name} has no default map: none of its maps beat random maps by a clear margin on AUL "
                f"(docs/explanation.md); ask for one by name ({have}) and read it with care"
            )
        method = self.default_method if method == "default" else method
        if method is None or method not in self.methods:
            raise ValueError(f"model {self.name} has no {method} map; it has: {have}")
        return method

    def view_names(self) -> list[str]:
        """What each view of the input shows, in order."""
        cfg = self.preprocess_cfg
        return view_names(cfg.crop, cfg.scan_view)

    def attribution(self, pre: list[Preprocessed], *, cells: int = 8, views: int | None = None) -> np.ndarray:
        """Occlusion maps (:func:`~liverus.engine.attribution.occlusion_maps`) of the first ``views`` views (None:
        every view) of each image (the box as given, not its averaged variants). Returns: (N, views, S, S) in
        log-odds of malignancy."""
        runner = self._torch("occlusion maps")
        pixels = self._pixels(pre)
        with self._lock:
            return runner.occlusion(pixels, views=views, cells=cells)

    def heatmap(self, pre: Preprocessed, method: str = "gradcam") -> np.ndarray:
        """A [0, 1] heatmap (S, S) on the preprocessed image: Grad-CAM for the malignant class, or the model's own
        spatial-attention map. PyTorch models only.

        Raises:
            ValueError: for ONNX models, or ``attention`` on a model without spatial attention.
        """
        return self.heatmaps([pre], method)[0]

    def heatmap_figure(
        self, pre: Preprocessed, image: np.ndarray, probability: float, method: str = "default", *, lesion_source=""
    ) -> np.ndarray:
        """The figure ``predict`` and ``explain`` write: the map on the analysed crop (each view, for occlusion) and
        drawn back onto the original ``image`` (gray float in [0, 1]), with the probability. Returns: an RGB
        ``uint8`` image."""
        method = self.check_method(method)
        original = np.clip(image * 255 + 0.5, 0, 255).astype(np.uint8)
        if method.startswith("occlusion"):
            maps = self.attribution([pre], views=None if method == "occlusion_views" else 1)[0]
            planes = [pre.image] + ([pre.context[0]] if pre.context is not None else [])
            return attribution_figure(
                list(zip(self.view_names(), planes, maps, strict=False)), probability=probability,
                lesion=pre.lesion if self.needs_lesion else None, original_u8=original, box=pre.box,
                letterbox=self.preprocess_cfg.letterbox, lesion_source=lesion_source, note=self.method_note(method),
            )  # fmt: skip
        return heatmap_figure(
            pre.image, self.heatmap(pre, method), probability=probability, note=self.method_note(method),
            title="Grad-CAM" if method == "gradcam" else "spatial attention", original_u8=original, box=pre.box,
            letterbox=self.preprocess_cfg.letterbox, lesion_source=lesion_source,
        )  # fmt: skip

    def heatmaps(self, pre: list[Preprocessed], method: str = "gradcam") -> np.ndarray:
        """:meth:`heatmap` for several images in one pass. Returns: (N, S, S)."""
        runner = self._torch("heatmaps")
        pixels = self._pixels(pre)
        with self._lock:
            return runner.heatmaps(pixels, method)


def _per_case_classes(probs: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Each case's class probabilities (n, C) from those of its inputs (its boxes, :func:`_with_variants`): the
    softmax of their mean log-probability."""
    return np.stack([average_probabilities(list(probs[owner == i, None]))[0] for i in range(n)])


def _per_case(probs: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Each case's probability of malignancy (the last class) from the class probabilities of its inputs."""
    return _per_case_classes(probs, owner, n)[:, -1]


def _with_variants(pre: list[Preprocessed]) -> tuple[list[Preprocessed], np.ndarray]:
    """Each case followed by the other boxes it is averaged over, and for every input the index of its case."""
    expanded = [p for case in pre for p in (case, *case.variants)]
    owner = np.repeat(np.arange(len(pre)), [1 + len(case.variants) for case in pre])
    return expanded, owner
