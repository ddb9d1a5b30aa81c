"""``liverus export``: a trained model to ONNX, with normalisation and softmax inside the graph and the preprocessing
settings, threshold and class names as metadata, checked against PyTorch with ONNX Runtime before it is written."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from liverus.engine.forward import normalize_images
from liverus.engine.onnx_runner import ONNX_METADATA_KEY
from liverus.models import ModelCard, is_feature_model, load_model
from liverus.utils import atomic_write_bytes

__all__ = ["DeployableModel", "DeployableFeatureModel", "export_onnx", "quantize_int8", "MAX_AUC_CHANGE"]

TOLERANCE = 1e-4
# An int8 model is written only when it moves the held-out AUC by at most this much.
MAX_AUC_CHANGE = 0.005


class DeployableModel(nn.Module):
    """Input: preprocessed gray images in [0, 1], (N, 1, S, S) (with the lesion mask, (N, 2, S, S): see the card).
    Output: class probabilities (N, k)."""

    def __init__(self, model: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.model = model
        self.in_chans = card.in_chans
        mean, std = card.normalization
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(normalize_images(image, self.mean, self.std, self.in_chans)), dim=1)


class DeployableFeatureModel(nn.Module):
    """A feature model (or an ensemble of them, as the recommended model) for ONNX: everything but the radiomics.

    Inputs: ``image`` as :class:`DeployableModel`'s, and ``radiomics`` (N, R): the
    :func:`~liverus.data.radiomics.feature_matrix` of the lesion crop's gray pixels (uint8) and mask, computed outside
    the graph with numpy and scikit-image. Output: class probabilities (N, 2). Inside: the frozen backbone's features
    of every view (mirrors, turns, zooms), standardisation, PCA, each member's classifier and Platt scaling, the
    members' temperature-scaled mean.
    """

    def __init__(self, model: nn.Module, card: ModelCard) -> None:
        super().__init__()
        members = list(getattr(model, "members", [model]))
        first = members[0]
        if first.lesion_size is not None:
            raise ValueError(
                "this feature model resizes the lesion crop inside itself (model.lesion_size); its export is not "
                "supported: deploy the model.pt itself (liverus predict / serve read it directly)"
            )
        self.model = model
        self.members = members
        self.in_chans, self.views = card.in_chans, card.views
        temps = getattr(model, "temperature", torch.ones(1))
        self.register_buffer("temperature", temps.detach().clone().float())
        mean, std = card.normalization
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        # As the ensemble does: members whose frozen backbones hold the first's weights share its deep features.
        self.shared = len(members) == 1 or model._shared_backbone()

    def forward(self, image: torch.Tensor, radiomics: torch.Tensor) -> torch.Tensor:
        x = normalize_images(image, self.mean, self.std, self.in_chans, self.views)
        first_deep = self.members[0].deep_features(x)
        probs = []
        for i, member in enumerate(self.members):
            deep = first_deep if self.shared or i == 0 else member.deep_features(x)
            z = member.decision(member.scaled_features(radiomics, deep))
            probs.append(torch.softmax(torch.stack([torch.zeros_like(z), z], dim=1) / self.temperature[i], dim=1))
        return torch.stack(probs).mean(0)


def _check_inputs(card: ModelCard, chans: int, size: int, n: int, run_length: bool | None) -> dict[str, np.ndarray]:
    """Inputs for the export check: random images (and, for feature models, a lesion disc in the mask channel and
    the radiomics of each image's lesion)."""
    rng = np.random.default_rng(0)
    image = rng.random((n, chans, size, size), dtype=np.float32)
    if run_length is None:
        return {"image": image}
    from liverus.data.radiomics import feature_matrix

    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        disc = (yy - size / 2) ** 2 + (xx - size / 2 - 4 * i) ** 2 < (size / (4 + i)) ** 2
        image[i, 0] = np.where(disc, image[i, 0] * 0.5, image[i, 0])  # a darker lesion, as on B-mode
        image[i, 1::2] = disc  # every view's mask channel
    pixels = np.round(image[:, 0] * 255).astype(np.uint8)
    image[:, 0] = pixels / 255.0
    rad = feature_matrix(pixels, image[:, 1] > 0.5, run_length=run_length).astype(np.float32)
    return {"image": image, "radiomics": rad}


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = 18,
    check_batch: int = 4,
    quantize: str | None = None,
    calibration: str | Path | None = None,
    holdout: str | Path | None = None,
    max_auc_change: float = MAX_AUC_CHANGE,
) -> dict:
    """Export ``model.pt`` to ONNX and verify ONNX Runtime against PyTorch on random inputs; with
    ``quantize="int8"``, quantize it statically (see :func:`quantize_int8`).

    Returns:
        A summary with the output path, the input size and the largest absolute difference (and, for int8, the
        held-out AUC before and after).

    Raises:
        ValueError: if ``out`` exists, ONNX Runtime differs from PyTorch by more than 1e-4, or int8 moves the
            held-out AUC by more than ``max_auc_change``.
    """
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out (exports are never overwritten)")
    model, card = load_model(checkpoint)
    pre = card.require_preprocess(checkpoint)
    size = pre.image_size
    per_view = 2 if pre.lesion_channel else 1
    chans = per_view * card.views
    features = is_feature_model(card.model_name)
    if features and quantize is not None:
        raise ValueError(
            "--quantize int8 applies to CNN exports; a feature model's export runs its frozen backbone in fp32 (its "
            "classifier was fitted on fp32 features)"
        )
    wrapper = (DeployableFeatureModel if features else DeployableModel)(model, card).eval()
    run_length = bool(wrapper.members[0].run_length) if features else None
    inputs = _check_inputs(card, chans, size, max(check_batch, 2), run_length)
    meta = _metadata(card, per_view, chans, run_length)
    data, diff = _export_checked(wrapper, inputs, meta, opset)
    if diff > TOLERANCE:
        raise ValueError(f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {TOLERANCE}); export refused")
    summary = {"onnx": str(out), "image_size": size, "max_abs_diff_vs_pytorch": diff, "opset": opset}
    if quantize == "int8":
        data, q = quantize_int8(data, checkpoint, card, calibration=calibration, holdout=holdout,
                                max_auc_change=max_auc_change)  # fmt: skip
        summary["int8"] = q
    elif quantize is not None:
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    atomic_write_bytes(out, data)
    return {**summary, **meta}


def _metadata(card: ModelCard, per_view: int, chans: int, run_length: bool | None) -> dict:
    """The card, which travels in the graph's metadata, and what a non-liverus consumer feeds the inputs."""
    what = "gray image and lesion mask" if per_view == 2 else "gray image"
    if card.views > 1:
        what = f"{what} of the lesion crop, then of the whole scan,"
    meta = {**card.to_dict(), "input": f"{what} in [0, 1] after liverus preprocessing, shape (N, {chans}, S, S)"}
    if run_length is not None:
        meta["radiomics"] = {
            "run_length": run_length,
            "input": "liverus.data.radiomics.feature_matrix of the lesion crop's uint8 gray pixels and mask "
            "(channels 0 and 1 of image), float32 (N, R)",
        }
    return meta


def _export_checked(wrapper: nn.Module, inputs: dict[str, np.ndarray], meta: dict, opset: int) -> tuple[bytes, float]:
    """The ONNX graph of ``wrapper`` with ``meta`` (bytes), and the largest difference of ONNX Runtime's
    probabilities from PyTorch's on ``inputs``."""
    import onnx
    import onnxruntime as ort

    with torch.no_grad():  # an eager pass first: the turn grids are then constants of the traced graph
        want = wrapper(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    batch = torch.export.Dim("batch")
    # The dynamo exporter (torch.export): the TorchScript one is deprecated in torch >= 2.9. Its graphs start at
    # opset 18; a lower --opset is reached by ONNX's version converter.
    program = torch.onnx.export(
        wrapper,
        tuple(torch.from_numpy(v[:2]) for v in inputs.values()),  # batch 2: a size-1 batch would be fixed
        input_names=list(inputs),
        output_names=["probabilities"],
        dynamic_shapes={name: {0: batch} for name in inputs},
        opset_version=opset,
        dynamo=True,
        verbose=False,
    )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = sess.run(["probabilities"], inputs)[0]
    return data, float(np.abs(got - want).max())


class _Reader:
    """ONNX Runtime's calibration interface over preprocessed images, one at a time."""

    def __init__(self, pixels: np.ndarray) -> None:
        self._it = iter(pixels)

    def get_next(self) -> dict | None:
        x = next(self._it, None)
        return None if x is None else {"image": x[None]}


def _run_cases(checkpoint: str | Path, card: ModelCard, calibration, holdout) -> tuple[list, list]:
    """Calibration and held-out cases: the given labelled data, else the run's training and validation parts."""
    import yaml

    from liverus.data import load_task_cases

    if calibration is not None and holdout is not None:
        return load_task_cases(calibration, card.task)[0], load_task_cases(holdout, card.task)[0]
    run = Path(checkpoint).resolve().parent
    if not (run / "config.yaml").is_file() or not (run / "splits.json").is_file():
        raise ValueError(
            f"{checkpoint} is not inside a training run folder (config.yaml, splits.json); give --calibration DATA "
            "(training images) and --holdout DATA (labelled images the model did not train on)"
        )
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    source = cfg["data"]["source"] or run / "phantom"
    cases = {c.path: c for c in load_task_cases(source, card.task, cfg["data"].get("group_by", "source"))[0]}
    split = json.loads((run / "splits.json").read_text())["folds"][0]
    held = [cases[p] for p in split.get("val", []) if p in cases]
    if not held:
        raise ValueError(f"the run {run} has no validation part to check int8 on; give --holdout DATA")
    return [cases[p] for p in split["train"] if p in cases], held


def _pixels(cases: list, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    from liverus.data import CaseCache, model_pixels

    cache = CaseCache(card.preprocess)
    arr = np.stack([cache.get(c) for c in cases])
    x = model_pixels(arr, card.preprocess.lesion_channel).astype(np.float32) / 255.0
    return x, np.array([card.classes.index(c.label) for c in cases])


def quantize_int8(
    fp32: bytes,
    checkpoint: str | Path,
    card: ModelCard,
    *,
    calibration=None,
    holdout=None,
    max_auc_change: float = MAX_AUC_CHANGE,
    max_calibration: int = 128,
) -> tuple[bytes, dict]:
    """Static int8 quantization with ONNX Runtime (QDQ, per-channel weights), calibrated on training images, and
    refused unless the AUC on held-out images moves by at most ``max_auc_change``.

    Returns:
        ``(int8 model bytes, {"auc_fp32", "auc_int8", "auc_change", "calibration_images", "holdout_images"})``.

    Raises:
        ValueError: when the AUC moves too much, or there are no images to calibrate or check on.
    """
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from sklearn.metrics import roc_auc_score

    if not card.is_binary:
        raise ValueError("int8 export is checked by the held-out AUC of a binary model")
    calib_cases, held_cases = _run_cases(checkpoint, card, calibration, holdout)
    if not calib_cases or not held_cases:
        raise ValueError("int8 export needs calibration (training) images and held-out labelled images")
    rng = np.random.default_rng(0)
    if len(calib_cases) > max_calibration:
        calib_cases = [calib_cases[i] for i in sorted(rng.choice(len(calib_cases), max_calibration, replace=False))]
    calib, _ = _pixels(calib_cases, card)
    held, y = _pixels(held_cases, card)
    if len(set(y.tolist())) < 2:
        raise ValueError("the held-out images hold one class only; the AUC cannot check the int8 model")
    with tempfile.TemporaryDirectory() as tmp:
        src, pre, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(fp32)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), _Reader(calib), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
        proto = onnx.load(str(dst))
    meta = json.loads(next(p.value for p in onnx.load_from_string(fp32).metadata_props if p.key == ONNX_METADATA_KEY))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = ONNX_METADATA_KEY, json.dumps({**meta, "quantization": "int8 (ONNX Runtime static, QDQ)"})
    data = proto.SerializeToString()

    def auc(model: bytes) -> float:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        p = np.concatenate(
            [sess.run(["probabilities"], {"image": held[i : i + 32]})[0] for i in range(0, len(held), 32)]
        )
        return float(roc_auc_score(y, p[:, 1]))

    a32, a8 = auc(fp32), auc(data)
    info = {"auc_fp32": a32, "auc_int8": a8, "auc_change": a8 - a32, "calibration_images": len(calib),
            "holdout_images": len(held)}  # fmt: skip
    if abs(a8 - a32) > max_auc_change:
        raise ValueError(
            f"int8 quantization moves the held-out AUC from {a32:.4f} to {a8:.4f} (change {a8 - a32:+.4f}, allowed "
            f"{max_auc_change}); export refused. Export without --quantize (fp32) instead."
        )
    return data, info
