"""``liverus export``: a trained model to ONNX, with normalisation and softmax inside the graph and the preprocessing
settings, threshold and class names as metadata, checked against PyTorch with ONNX Runtime before it is written."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["DeployableModel", "export_onnx"]

TOLERANCE = 1e-4


class DeployableModel(nn.Module):
    """Input: preprocessed gray images in [0, 1], (N, 1, S, S). Output: class probabilities (N, k)."""

    def __init__(self, model: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))
        self.expand_rgb = model.in_chans == 3

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std
        if self.expand_rgb:
            x = x.expand(-1, 3, -1, -1)
        return torch.softmax(self.model(x), dim=1)


def export_onnx(checkpoint: str | Path, out: str | Path, *, opset: int = 17, check_batch: int = 4) -> dict:
    """Export ``model.pt`` to ONNX and verify ONNX Runtime against PyTorch on random inputs.

    Returns:
        A summary with the output path, the input size and the largest absolute difference.

    Raises:
        ValueError: if ``out`` exists, or ONNX Runtime differs from PyTorch by more than 1e-4.
    """
    import onnx
    import onnxruntime as ort

    from liverus.models import load_model
    from liverus.utils import atomic_write_bytes

    out = Path(out)
    if out.exists():
        raise ValueError(f"{out} already exists; choose another --out (exports are never overwritten)")
    model, extra = load_model(checkpoint)
    if "preprocess" not in extra:
        raise ValueError(f"{checkpoint} holds no preprocessing settings; export the model.pt of a training run")
    mean, std = extra.get("normalization", model.normalization)
    wrapper = DeployableModel(model, mean, std).eval()
    size = int(extra["preprocess"]["image_size"])
    dummy = torch.rand(1, 1, size, size)
    meta = {
        "model_name": model.model_name,
        "threshold": float(extra.get("threshold", 0.5)),
        "classes": list(extra.get("classes", ["benign", "malignant"])),
        "preprocess": extra["preprocess"],
        "normalization": [float(mean), float(std)],
        "version": extra.get("version", ""),
        "input": "gray image in [0, 1] after liverus preprocessing, shape (N, 1, S, S)",
    }
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
        entry.key, entry.value = "liverus", json.dumps(meta)
        onnx.checker.check_model(proto)
        data = proto.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = torch.rand(check_batch, 1, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = wrapper(x).numpy()
    got = sess.run(["probabilities"], {"image": x.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > TOLERANCE:
        raise ValueError(f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {TOLERANCE}); export refused")
    atomic_write_bytes(out, data)
    return {"onnx": str(out), "image_size": size, "max_abs_diff_vs_pytorch": diff, "opset": opset, **meta}
