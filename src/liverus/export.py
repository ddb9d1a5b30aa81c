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
from liverus.engine.predictor import ONNX_METADATA_KEY
from liverus.models import ModelCard, is_feature_model, load_card, load_model
from liverus.utils import atomic_write_bytes

__all__ = ["DeployableModel", "export_onnx"]

TOLERANCE = 1e-4


class DeployableModel(nn.Module):
    """Input: preprocessed gray images in [0, 1], (N, 1, S, S). Output: class probabilities (N, k)."""

    def __init__(self, model: nn.Module, card: ModelCard) -> None:
        super().__init__()
        self.model = model
        self.in_chans = card.in_chans
        mean, std = card.normalization
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(normalize_images(image, self.mean, self.std, self.in_chans)), dim=1)


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = 17, check_batch: int = 4) -> dict:
    """Export ``model.pt`` to ONNX and verify ONNX Runtime against PyTorch on random inputs.

    Returns:
        A summary with the output path, the input size and the largest absolute difference.

    Raises:
        ValueError: if ``out`` exists, or ONNX Runtime differs from PyTorch by more than 1e-4.
    """
    import onnx
    import onnxruntime as ort

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out (exports are never overwritten)")
    if is_feature_model(load_card(checkpoint).model_name):
        raise ValueError(
            f"{checkpoint} is a radiomics feature model: its lesion features are computed by scikit-image, which an "
            "ONNX graph cannot express; deploy the model.pt itself (liverus predict / serve read it directly)"
        )
    model, card = load_model(checkpoint)
    pre = card.require_preprocess(checkpoint)
    size = pre.image_size
    wrapper = DeployableModel(model, card).eval()
    chans = 2 if pre.lesion_channel else 1
    dummy = torch.rand(1, chans, size, size)
    # The card travels in the graph's metadata; "input" tells non-liverus consumers what to feed.
    what = "gray image and lesion mask" if chans == 2 else "gray image"
    meta = {**card.to_dict(), "input": f"{what} in [0, 1] after liverus preprocessing, shape (N, {chans}, S, S)"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            wrapper,
            (dummy,),
            str(tmp_path),
            input_names=["image"],
            output_names=["probabilities"],
            dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
        proto = onnx.load(str(tmp_path))
        entry = proto.metadata_props.add()
        entry.key, entry.value = ONNX_METADATA_KEY, json.dumps(meta)
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.rand(check_batch, chans, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = wrapper(x).numpy()
    got = sess.run(["probabilities"], {"image": x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > TOLERANCE:
        raise ValueError(f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {TOLERANCE}); export refused")
    atomic_write_bytes(out, data)
    return {"onnx": str(out), "image_size": size, "max_abs_diff_vs_pytorch": diff, "opset": opset, **meta}
