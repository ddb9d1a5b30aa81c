"""Training configuration: YAML file + ``section.key=value`` overrides, validated into dataclasses.

Unknown keys and values of the wrong type are errors that name the key (and suggest the closest valid one), so a
typo in a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from liverus.data.audit import GROUPINGS
from liverus.data.augment import AUGMENT_LEVELS
from liverus.data.cases import CLASS_SETS
from liverus.data.preprocess import BOX_MASKS, CROP_MODES, LESION_SOURCES, MAX_BOX_AVERAGE, PreprocessConfig
from liverus.engine.runtime import CHANNELS_LAST_SETTINGS, PRECISIONS
from liverus.models import has_frozen_backbone, is_feature_model, is_scan_model, list_models
from liverus.models.card import REMOVED_PREPROCESSING
from liverus.models.features import MAX_FEATURE_ROTATION, MAX_FEATURE_ZOOM
from liverus.models.registry import is_known_model
from liverus.models.segmentation import SEGMENTERS
from liverus.training.losses import LOSSES
from liverus.training.optim import OPTIMIZERS

__all__ = [
    "ConfigError",
    "DataConfig",
    "PreprocessSettings",
    "ModelConfig",
    "OptimConfig",
    "LossConfig",
    "RuntimeConfig",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_to_dict",
    "config_from_dict",
    "REMOVED_KEYS",
    "is_removed_and_off",
]


class ConfigError(ValueError):
    """An invalid configuration; the message names the key and the problem."""


# Options liverus no longer has: {"section.key": (the value that turned the option off, why it went and what to use
# instead)}. Run folders written while an option existed hold its key at that value: such configs still load (the
# key is dropped, the run is what it was) and still resume; any other value is an error that names the key.
REMOVED_KEYS: dict[str, tuple[object, str]] = {
    "data.context_margin": (
        REMOVED_PREPROCESSING["context_margin"][0],  # the model card's record of the mode: one off value
        "the CNN's two-view input (a wide context crop beside the lesion crop) did not beat one view on AUL "
        "(docs/results.md); for a second view, use a radiomics_<classifier>_<backbone> model with data.scan_view: "
        "true",
    ),
}


def is_removed_and_off(dotted: str, value: object) -> bool:
    """Whether ``dotted`` (``section.key``) is a removed option (:data:`REMOVED_KEYS`) and ``value`` its off value,
    which a config may still hold."""
    if dotted not in REMOVED_KEYS:
        return False
    off = REMOVED_KEYS[dotted][0]
    try:
        return _coerce(value, type(off), dotted) == off
    except ConfigError:
        return False


# PreprocessConfig's fields that are set per call, not chosen in a config: the DICOM frame (the middle one unless a
# caller asks for another) and which of the averaged boxes one pass preprocesses (set by box_variants).
_PER_CALL_PREPROCESSING = ("frame", "box_variant")


def _preprocess_settings() -> type:
    """A dataclass of :class:`PreprocessConfig`'s fields, less the per-call ones, with its types and defaults: the
    base of :class:`DataConfig`, so each preprocessing setting is declared (and documented) once, in
    PreprocessConfig, and still reads as a flat key of the ``data`` section (``data.image_size``, ``data.crop``)."""
    hints = typing.get_type_hints(PreprocessConfig)
    settings = [
        (f.name, hints[f.name], field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(PreprocessConfig)
        if f.name not in _PER_CALL_PREPROCESSING
    ]
    doc = "The preprocessing settings of :class:`PreprocessConfig` (documented there) as config keys."
    return dataclasses.make_dataclass(
        "PreprocessSettings", settings, namespace={"__module__": __name__, "__doc__": doc}
    )


PreprocessSettings = _preprocess_settings()


@dataclass
class DataConfig(PreprocessSettings):
    """The ``data`` section: the preprocessing settings, inherited from :class:`PreprocessConfig`'s fields (all but
    the per-call ``frame`` and ``box_variant``; documented in its docstring), and the data and training options below.
    """

    source: str = ""  # folder, manifest CSV or AUL folder; empty: the built-in phantom
    task: str = "binary"  # binary | three_class
    test_lesion_from: str = ""  # mask | box for the held-out test part (a study's folds); empty: as lesion_from
    box_copies: int = 0  # feature models: also fit on each training case from this many boxes around its mask
    box_copy_jitter: float = 0.2  # each edge of a copy's box moves by up to this fraction of its size (seeded)
    balance_by: str = ""  # weigh every class x acquisition group evenly: size_group (any dataset), image_size, a column
    augment: str = "strong"  # none | light | strong
    splits: str = ""  # splits JSON to reuse; empty: make one in the run folder
    group_by: str = "source"  # source | near_duplicates (merge groups of exact and near-duplicate images)
    fold: int = 0  # which fold of the splits file is used
    val_fraction: float = 0.2
    skip_bad: bool = False
    cache_dir: str = ""  # decoded-image cache; empty: $LIVERUS_CACHE or the run (study) folder's cache/; "memory"
    num_workers: int = 0
    phantom_patients: int = 120  # size of the phantom when source is empty
    phantom_size: int = 256

    def preprocess(self) -> PreprocessConfig:
        """What the model sees (the preprocessing part of this section), checked by :class:`PreprocessConfig`.

        Raises:
            ValueError: for values :class:`PreprocessConfig` refuses (``TrainConfig.validate`` names the key).
        """
        return PreprocessConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(PreprocessSettings)})

    def test_preprocess(self) -> PreprocessConfig:
        """What the held-out test part is scored on: :meth:`preprocess` with the lesion from ``test_lesion_from``
        (a model trained on expert masks, scored on the boxes a user draws, as it will be used)."""
        return dataclasses.replace(self.preprocess(), lesion_from=self.test_lesion_from or self.lesion_from)


@dataclass
class ModelConfig:
    name: str = "custom_resnet50"
    weights: str | None = None  # None | imagenet | path to a backbone state dict
    in_chans: int = 1
    drop_rate: float = 0.5
    drop_path_rate: float | None = None  # stochastic depth (EfficientNet-Lite0 only; None: its default 0.2)
    threshold: float | None = None  # operating threshold when training without validation (data.val_fraction: 0)
    ensemble: int = 0  # K >= 2: the model is the ensemble of K fold models (liverus.training.ensemble); 0 or 1: one
    se_reduction: int = 16
    ca_reduction: int = 16
    spatial_kernel: int = 7
    pca_dim: int = 32  # radiomics_*_<backbone> models: principal components kept of the frozen deep features
    flip_features: bool = False  # radiomics_*_<backbone>: deep features averaged with those of the mirrored crop
    rotate_features: float = 0.0  # radiomics_*_<backbone>: lesion-crop deep features also averaged over +-this angle
    zoom_features: float = 0.0  # radiomics_*_<backbone>: ... and over the crop zoomed by 1 -+ this
    run_length: bool = False  # radiomics_*: add the grey-level run-length (GLRLM) texture features
    lesion_size: int | None = None  # radiomics_*: lesion crop resized to this (data.image_size: the scan view)


@dataclass
class OptimConfig:
    optimizer: str = "adamw"  # adamw | sgd
    lr: float = 3e-4  # head learning rate
    backbone_lr_mult: float = 0.1  # backbone lr = lr * this
    weight_decay: float = 1e-4
    momentum: float = 0.9
    epochs: int = 20
    warmup_epochs: float = 1.0
    batch_size: int = 32  # global batch (split across DDP ranks)
    accum_steps: int = 1
    grad_clip: float = 1.0  # max gradient norm; 0 disables
    freeze_backbone_epochs: int = 0
    freeze_bn: bool = False  # keep BatchNorm statistics fixed (small batches, exact DDP equivalence)
    early_stopping_patience: int = 0  # epochs without val AUC gain; 0 disables


@dataclass
class LossConfig:
    name: str = "weighted_ce"  # ce | weighted_ce | focal
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    balanced_sampler: bool = False
    attention_weight: float = 0.0  # > 0: supervise the spatial-attention map with the lesion mask (custom_* models)
    segmentation_weight: float = 0.0  # > 0: an auxiliary head learns the lesion mask from the pooled feature map
    debias_by: str = ""  # adversarial debiasing against this acquisition group (a manifest column, or image_size)
    debias_weight: float = 0.1  # weight (and gradient-reversal scale) of the debiasing head's loss


@dataclass
class RuntimeConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    channels_last: str = "auto"  # auto | true | false (auto: on where it is faster, i.e. CUDA or CPU with bf16)
    compile: bool = False
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    progress: bool = True
    tensorboard: bool = True


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> TrainConfig:
        """Check value ranges and choices. Raises: ConfigError."""
        self.runtime.channels_last = str(self.runtime.channels_last).lower()
        # The checks run in this order so that a config with several problems always names the same one first.
        _validate_choices(self)
        _validate_ranges(self)
        _validate_threshold(self)
        _validate_model(self)
        if is_feature_model(self.model.name):
            _validate_feature_model(self)
        if is_scan_model(self.model.name):
            _validate_scan_model(self)
        if self.model.ensemble >= 2 and self.data.task != "binary":
            raise ConfigError(
                "model.ensemble: an ensemble's members are calibrated and its operating points chosen on a binary "
                f"malignancy score; task {self.data.task} trains one model (set model.ensemble: 0)"
            )
        _validate_feature_options(self)
        _validate_box_copies_and_scan_view(self)
        try:  # one set of preprocessing checks, PreprocessConfig's; here they name the config key
            self.data.preprocess()
        except ValueError as e:
            raise ConfigError(f"data.{e}") from None
        return self


_POSITIVE = (
    ("data", "image_size"),
    ("optim", "lr"),
    ("optim", "epochs"),
    ("optim", "batch_size"),
    ("optim", "accum_steps"),
)
_NON_NEGATIVE = (
    ("optim", "weight_decay"),
    ("optim", "warmup_epochs"),
    ("optim", "grad_clip"),
    ("optim", "freeze_backbone_epochs"),
    ("optim", "early_stopping_patience"),
    ("optim", "backbone_lr_mult"),
    ("loss", "focal_gamma"),
    ("loss", "attention_weight"),
    ("loss", "segmentation_weight"),
    ("data", "num_workers"),
    ("data", "fold"),
)


def _validate_choices(cfg: TrainConfig) -> None:
    """Every key with a fixed set of values holds one of them."""
    choices = {
        ("data", "task"): tuple(CLASS_SETS),
        ("data", "crop"): CROP_MODES,
        ("data", "augment"): AUGMENT_LEVELS,
        ("data", "group_by"): GROUPINGS,
        ("data", "lesion_from"): LESION_SOURCES,
        ("data", "test_lesion_from"): ("", *LESION_SOURCES),
        ("data", "box_mask"): BOX_MASKS,
        ("optim", "optimizer"): OPTIMIZERS,
        ("loss", "name"): LOSSES,
        ("runtime", "precision"): PRECISIONS,
        ("runtime", "channels_last"): CHANNELS_LAST_SETTINGS,
    }
    for (sec, key), allowed in choices.items():
        val = getattr(getattr(cfg, sec), key)
        if val not in allowed:
            raise ConfigError(f"{sec}.{key}: {val!r} is not one of {list(allowed)}")


def _validate_ranges(cfg: TrainConfig) -> None:
    """Sizes, rates and counts are in range: positive, non-negative, or a fraction below 1."""
    for sec, key in _POSITIVE:
        if (value := getattr(getattr(cfg, sec), key)) <= 0:
            raise ConfigError(f"{sec}.{key}: must be positive, got {value}")
    for sec, key in _NON_NEGATIVE:
        if (value := getattr(getattr(cfg, sec), key)) < 0:
            raise ConfigError(f"{sec}.{key}: must not be negative, got {value}")
    if not 0 <= cfg.loss.label_smoothing < 1:
        raise ConfigError(f"loss.label_smoothing: must be in [0, 1), got {cfg.loss.label_smoothing}")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction: must be in [0, 1), got {cfg.data.val_fraction}")


def _validate_scan_model(cfg: TrainConfig) -> None:
    """A whole-scan feature model sees the gray scan alone and fits each one-vs-rest side with equal weight."""
    name = cfg.model.name
    if cfg.data.lesion_channel or cfg.model.in_chans != 1:
        raise ConfigError(
            f"data.lesion_channel / model.in_chans: {name} reads the gray scan alone (no lesion input); set "
            "data.lesion_channel: false and model.in_chans: 1"
        )
    if cfg.data.balance_by:
        raise ConfigError(
            f"data.balance_by: {name} weighs the two sides of each class's one-vs-rest fit equally and takes no "
            "other sample weights; set data.balance_by: ''"
        )


def _validate_threshold(cfg: TrainConfig) -> None:
    """A fixed threshold is a probability, and a run without validation has some way to choose its threshold."""
    if cfg.model.threshold is not None and not 0 < cfg.model.threshold < 1:
        raise ConfigError(f"model.threshold: must be in (0, 1), got {cfg.model.threshold}")
    if (
        cfg.data.val_fraction == 0
        and cfg.model.threshold is None
        and not cfg.data.splits
        and not cfg.model.ensemble
        and not is_feature_model(cfg.model.name)  # its inner cross-validation chooses the threshold
        and cfg.data.task == "binary"  # three classes: the label is the most probable class, no threshold
    ):
        raise ConfigError(
            "data.val_fraction: 0 trains on every case with no validation split, so the operating threshold "
            "cannot be chosen; set model.threshold (e.g. the pooled out-of-fold threshold of a cv study)"
        )


def _validate_model(cfg: TrainConfig) -> None:
    """The model section's own values: dropout, ensemble size, input channels and a known model name."""
    if not 0 <= cfg.model.drop_rate < 1:
        raise ConfigError(f"model.drop_rate: must be in [0, 1), got {cfg.model.drop_rate}")
    if cfg.model.ensemble < 0:
        raise ConfigError(
            f"model.ensemble: the number of fold members (>= 2), or 0 or 1 for one model; got {cfg.model.ensemble}"
        )
    if cfg.model.ensemble == 1:  # one member is one model: train it as such (no inner folds)
        cfg.model.ensemble = 0
    if cfg.model.in_chans not in (1, 3):
        raise ConfigError(f"model.in_chans: must be 1 or 3, got {cfg.model.in_chans}")
    if cfg.model.name not in SEGMENTERS and not is_known_model(cfg.model.name):
        close = difflib.get_close_matches(cfg.model.name, list_models(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"model.name: unknown model {cfg.model.name!r}{hint} (a family on any timm CNN: e.g. "
            "custom_timm_convnext_tiny, radiomics_svm_timm_efficientnet_b3)"
        )


def _validate_feature_model(cfg: TrainConfig) -> None:
    """A fitted feature model (``radiomics_*``) gets what it computes its features from, and no gradient losses."""
    name = cfg.model.name
    if not cfg.data.lesion_channel:
        raise ConfigError(
            f"model.name: {name} computes features of the lesion and needs its mask: set "
            "data.lesion_channel: true (with crop: roi, so the crop is scaled to the lesion)"
        )
    if cfg.data.task != "binary":
        raise ConfigError(f"model.name: {name} is binary; set data.task: binary")
    if cfg.model.in_chans != 1:
        raise ConfigError("model.in_chans: feature models read the gray image; set it to 1")
    auxiliary = {"attention_weight": "0", "segmentation_weight": "0", "debias_by": "''"}
    for key, off in auxiliary.items():
        if getattr(cfg.loss, key):
            raise ConfigError(
                f"loss.{key}: an auxiliary loss of gradient training; {name} is a fitted feature "
                f"model (set it to {off})"
            )


def _validate_feature_options(cfg: TrainConfig) -> None:
    """The options of a feature model's features are set only on a model that has those features."""
    name = cfg.model.name
    if cfg.model.run_length and not is_feature_model(name):
        raise ConfigError(
            f"model.run_length: adds run-length texture features to the radiomics of a radiomics_* model; "
            f"{name} computes no radiomics (set it to false)"
        )
    if cfg.model.flip_features and not has_frozen_backbone(name):
        raise ConfigError(
            f"model.flip_features: averages the frozen backbone's features of a radiomics_<classifier>_<backbone> "
            f"model; {name} has no frozen backbone features (set it to false)"
        )
    for key, top in (("rotate_features", MAX_FEATURE_ROTATION), ("zoom_features", MAX_FEATURE_ZOOM)):
        value = getattr(cfg.model, key)
        if not 0 <= value <= top:
            raise ConfigError(f"model.{key}: must be in [0, {top:g}], got {value} (0 turns it off)")
        if value and not has_frozen_backbone(name):
            raise ConfigError(
                f"model.{key}: averages the frozen backbone's features of a radiomics_<classifier>_<backbone> "
                f"model's lesion crop; {name} has no frozen backbone features (set it to 0)"
            )
    if cfg.model.lesion_size is not None:
        if not is_feature_model(name):
            raise ConfigError(
                f"model.lesion_size: resizes the lesion crop inside a radiomics_* model; {name} is a "
                "CNN, whose input size is data.image_size (set lesion_size: null)"
            )
        if not 32 <= cfg.model.lesion_size <= cfg.data.image_size:
            raise ConfigError(
                f"model.lesion_size: the lesion crop is area-resized from data.image_size "
                f"({cfg.data.image_size}) down to this size; it must be in [32, {cfg.data.image_size}], got "
                f"{cfg.model.lesion_size} (raise data.image_size to prepare the views at more pixels)"
            )


def _validate_box_copies_and_scan_view(cfg: TrainConfig) -> None:
    """The data options only a feature model uses: box-derived training copies and the whole-scan view."""
    name = cfg.model.name
    if not 0 <= cfg.data.box_copies <= MAX_BOX_AVERAGE:
        raise ConfigError(f"data.box_copies: must be in [0, {MAX_BOX_AVERAGE}], got {cfg.data.box_copies}")
    if not 0 <= cfg.data.box_copy_jitter <= 0.5:
        raise ConfigError(f"data.box_copy_jitter: must be in [0, 0.5], got {cfg.data.box_copy_jitter}")
    if cfg.data.box_copies and not is_feature_model(name):
        raise ConfigError(
            f"data.box_copies: adds box-derived copies of the training cases to a fitted feature model's "
            f"training features; {name} is a CNN (train it on boxes with data.lesion_from: box, "
            "or set box_copies: 0)"
        )
    if cfg.data.scan_view and not has_frozen_backbone(name):
        kind = ("a radiomics-only model" if is_feature_model(name)
                else "a whole-scan feature model" if is_scan_model(name) else "a CNN")  # fmt: skip
        raise ConfigError(
            f"data.scan_view: adds the frozen backbone's features of the whole scan to a "
            f"radiomics_<classifier>_<backbone> model; {name} is {kind} (set scan_view: false)"
        )


def _coerce(value: Any, typ: Any, where: str) -> Any:
    """Check/convert ``value`` to the dataclass field type ``typ``."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null", "~") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _section_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def config_from_dict(data: dict, source: str) -> TrainConfig:
    """Build (without validating) a config from a dict such as a run's ``config.yaml``; ``source`` names it in
    errors. Raises: ConfigError."""
    cfg = TrainConfig()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a mapping of sections, got {type(data).__name__}")
    sections = {f.name for f in dataclasses.fields(TrainConfig)}
    for sec, values in data.items():
        if sec not in sections:
            close = difflib.get_close_matches(str(sec), sections, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown section {sec!r}{hint} (sections: {sorted(sections)})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {sec!r} must be a mapping")
        section = getattr(cfg, sec)
        types_ = _section_types(type(section))
        for key, val in values.items():
            if f"{sec}.{key}" in REMOVED_KEYS:
                if not is_removed_and_off(f"{sec}.{key}", val):
                    off, why = REMOVED_KEYS[f"{sec}.{key}"]
                    raise ConfigError(
                        f"{source}: {sec}.{key} was removed from liverus: {why}. Delete the key (or set it to {off})"
                    )
                continue
            if key not in types_:
                close = difflib.get_close_matches(str(key), types_, n=1)
                hint = f"; did you mean {sec}.{close[0]}?" if close else ""
                raise ConfigError(f"{source}: unknown key {sec}.{key}{hint}")
            setattr(section, key, _coerce(val, types_[key], f"{sec}.{key}"))
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (values parsed as YAML scalars).

    Raises:
        ConfigError: for a malformed override or an unknown key.
    """
    data = config_to_dict(cfg)
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} must look like section.key=value, e.g. optim.lr=1e-3")
        dotted, raw = item.split("=", 1)
        sec, key = dotted.split(".", 1)
        try:
            val = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            val = raw
        data.setdefault(sec, {})
        if not isinstance(data[sec], dict):
            raise ConfigError(f"override {item!r}: {sec!r} is not a section")
        data[sec][key] = val
    return config_from_dict(data, "override").validate()


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Load a YAML config (or the defaults when ``path`` is None) and apply overrides.

    Raises:
        ConfigError: for an unreadable file, an unknown section/key, a wrong type or an out-of-range value.
    """
    data: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"{p}: cannot read config ({exc})") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    cfg = config_from_dict(data, source)
    if overrides:
        return apply_overrides(cfg, overrides)
    try:
        return cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
