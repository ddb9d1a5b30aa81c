"""The model card: everything that travels with trained weights and that every consumer reads.

Like torchvision's ``Weights`` entries carry their transforms and metadata, a liverus ``model.pt`` (and its ONNX
export) carries a :class:`ModelCard`: the class names, the operating threshold and how it was chosen, the
preprocessing and normalisation the model was trained with, its input channels, the numeric precision its
probabilities were validated in, the package version and where the weights came from. ``predict``, ``evaluate``,
``explain``, ``serve`` and ``export`` read the card and nothing else, so they apply exactly what training validated.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from liverus.data.preprocess import PreprocessConfig

__all__ = ["ModelCard", "DEFAULT_CLASSES", "REMOVED_PREPROCESSING", "check_removed_modes"]

DEFAULT_CLASSES = {2: ("benign", "malignant"), 3: ("normal", "benign", "malignant")}

# Preprocessing settings of input modes that liverus no longer has: {key: (the value that means "off", what the mode
# did)}. Every card written while the mode existed holds the key; off, it is dropped on reading, since the model
# saw exactly what it sees now; on, the model cannot run here and is refused by name.
REMOVED_PREPROCESSING: dict[str, tuple[object, str]] = {
    "context_margin": (0.0, "a wide context crop beside the lesion crop, a second view through the same backbone"),
}


@dataclass(frozen=True)
class ModelCard:
    """Metadata of a trained model.

    Attributes:
        model_name: registry name the weights belong to.
        classes: class names in logit order.
        in_chans: input channels the network takes per view (gray images are repeated to 3 when this is 3).
        views: 1, or 2 for two-view input (a feature model's lesion crop then whole scan, ``2 * in_chans`` channels
            in all).
        normalization: ``(mean, std)`` applied to images scaled to [0, 1].
        preprocess: the preprocessing the model was trained with; ``None`` for a model saved outside a training run.
        threshold: operating threshold on p(malignant) (binary models).
        threshold_method: how the threshold was chosen.
        task: ``binary`` or ``three_class``.
        operating_points: named thresholds on p(malignant) (``youden``, ``rule_out``, ``rule_in``), chosen on the
            validation or pooled out-of-fold predictions; ``threshold`` is the one the label uses.
        operating_point_rates: what each named point is expected to give on new cases like those it was chosen on:
            ``{name: {"sensitivity", "sensitivity_ci95", "specificity", "specificity_ci95", "target",
            "target_held"}}`` (exact 95% intervals; rule-out and rule-in hold their targets at the lower bound).
        precision: numeric precision the stored probabilities and the thresholds were computed in, and that
            inference uses (bf16 only where it moved validation probabilities by less than 0.005).
        precision_gap: the largest bf16-vs-fp32 probability difference measured on the validation cases.
        members: number of models averaged (1: a single model; more: an ensemble of fold models).
        version: liverus version that trained the model.
        best_epoch: the epoch whose weights these are.
        val_auc: validation AUC of those weights (NaN without validation).
        provenance: seed, git commit and package versions of the training run.
    """

    model_name: str
    classes: tuple[str, ...]
    in_chans: int
    normalization: tuple[float, float]
    views: int = 1
    preprocess: PreprocessConfig | None = None
    threshold: float = 0.5
    threshold_method: str = "default (0.5)"
    task: str = "binary"
    operating_points: dict = field(default_factory=dict)
    operating_point_rates: dict = field(default_factory=dict)
    precision: str = "fp32"
    precision_gap: float | None = None
    members: int = 1
    version: str = ""
    best_epoch: int | None = None
    val_auc: float | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.classes) < 2:
            raise ValueError(f"a model card needs at least two classes, got {self.classes}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")

    @property
    def is_binary(self) -> bool:
        return len(self.classes) == 2

    def require_preprocess(self, source: object = "this model") -> PreprocessConfig:
        """Returns: the preprocessing. Raises: ValueError when the weights were not saved by a training run."""
        if self.preprocess is None:
            raise ValueError(f"{source} holds no preprocessing settings; use the model.pt of a training run")
        return self.preprocess

    def label(self, p_malignant: float) -> str:
        """The predicted class of a binary model at the stored threshold."""
        return self.classes[int(p_malignant >= self.threshold)]

    def crossed(self, p_malignant: float) -> list[str]:
        """The named operating points that ``p_malignant`` reaches (is at or above)."""
        return [name for name, t in self.operating_points.items() if p_malignant >= t]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (stored in ``model.pt`` and in the ONNX metadata)."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        d["normalization"] = [float(v) for v in self.normalization]
        if self.val_auc is not None and not math.isfinite(self.val_auc):
            d["val_auc"] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: object = "model card") -> ModelCard:
        """Build a card from :meth:`to_dict` output (also reads the untyped ``extra`` dict of earlier versions).

        Raises:
            ValueError: naming ``source`` when a required entry is missing or malformed, or when the model uses an
                input mode liverus no longer has (:func:`check_removed_modes`).
        """
        check_removed_modes(d, source=source)
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("model_name", "classes", "in_chans", "normalization"):
            if key not in kw:
                raise ValueError(f"{source}: the model card has no {key!r} entry")
        try:
            kw["classes"] = tuple(kw["classes"])
            kw["normalization"] = tuple(float(v) for v in kw["normalization"])
            if isinstance(pre := kw.get("preprocess"), dict):  # a removed mode left here was off: drop its key
                pre = {k: v for k, v in pre.items() if k not in REMOVED_PREPROCESSING}
            if pre is not None:
                kw["preprocess"] = PreprocessConfig(**pre)
            return cls(**kw)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: malformed model card ({exc})") from exc

    def replace(self, **changes: Any) -> ModelCard:
        return replace(self, **changes)


def check_removed_modes(card: dict[str, Any], *, source: object = "model card") -> None:
    """Refuse a model (its card as a dict, :meth:`ModelCard.to_dict`) trained with an input mode liverus no longer
    has (:data:`REMOVED_PREPROCESSING`), naming the mode and the liverus that trained it. Called before the model
    is rebuilt, so such a file gets this message rather than a failure of its layers.

    Raises:
        ValueError: naming ``source``, the setting and the version (and git commit) to run the model with.
    """
    preprocess = card.get("preprocess")
    if not isinstance(preprocess, dict):
        return
    for key, (off, what) in REMOVED_PREPROCESSING.items():
        value = preprocess.get(key, off)
        if value == off:
            continue
        commit = (card.get("provenance") or {}).get("git_commit")
        trained_by = f"version {card.get('version') or 'unknown'}" + (f", git commit {commit}" if commit else "")
        raise ValueError(
            f"{source}: this model was trained with data.{key}: {value} ({what}); liverus has removed that mode, so "
            f"this version cannot run the model. Use the liverus that trained it ({trained_by}), or retrain without "
            f"data.{key}"
        )
