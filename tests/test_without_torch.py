"""Deploying an ONNX export without PyTorch: `liverus predict` and `liverus serve` run in an interpreter where the
PyTorch stack cannot be imported, answer as the same export does with PyTorch installed, and the options that need
PyTorch say so and how to install it. The install route itself is requirements-onnx.lock (checked here against
requirements.lock and pyproject.toml)."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import cv2
import numpy as np
import pytest

from liverus.utils import FULL_INSTALL_ONLY, TORCH_PACKAGES

ROOT = Path(__file__).resolve().parents[1]

# Installed first in a fresh interpreter: every package the ONNX-only install leaves out (the PyTorch stack, and the
# rest of FULL_INSTALL_ONLY) then fails to import as a missing package does (ModuleNotFoundError), whatever is
# installed in this environment.
WITHOUT_PYTORCH = textwrap.dedent(f"""
    import sys

    class _AsTheOnnxOnlyInstall:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {sorted(FULL_INSTALL_ONLY)!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _AsTheOnnxOnlyInstall())
""")

CLI = "from liverus.cli import main\nsys.exit(main(sys.argv[1:]))\n"

# The predictor (unrounded probabilities) and the web service (its app, through starlette's TestClient) on one
# export; prints one JSON line.
PREDICTOR_AND_SERVICE = """
import json
from pathlib import Path

from starlette.testclient import TestClient

from liverus.engine.predictor import Predictor
from liverus.serve.app import create_app

sys.path.insert(0, sys.argv[3])  # this test file, for the preparation both interpreters share
from test_without_torch import prepared

model, cases = sys.argv[1], json.loads(sys.argv[2])
pred = Predictor.from_path(model)
out = {"backend": pred.backend, "p": pred.probabilities(prepared(pred, cases)).tolist()}
one = next(c for c in cases if not c.get("mask"))
form = {"box": ",".join(str(v) for v in one["box"])} if one.get("box") else {}
with TestClient(create_app(pred)) as client:
    out["health"] = client.get("/api/health").json()
    r = client.post("/api/predict", files={"file": ("x.png", Path(one["path"]).read_bytes(), "image/png")}, data=form)
    out["api"] = {"status": r.status_code, **r.json()}
print(json.dumps(out))
"""


def without_pytorch(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` (with ``args`` as ``sys.argv[1:]``) in a fresh interpreter that cannot import PyTorch, nor
    anything else the ONNX-only install leaves out."""
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_PYTORCH + code, *map(str, args)], capture_output=True, text=True, timeout=600
    )


def _clear_pytorch_error(p: subprocess.CompletedProcess, *what: str) -> None:
    """A one-line error (no traceback) that says what needs PyTorch and the command that installs it."""
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and "needs PyTorch" in p.stderr, p.stderr
    assert "pip install -r requirements.lock" in p.stderr, p.stderr
    for text in what:
        assert text in p.stderr, p.stderr


# ---------------------------------------------------------------- fast: imports, errors, the lock files


def test_the_deployment_modules_import_without_pytorch():
    blocked = without_pytorch("import torch")
    assert blocked.returncode == 1 and "ModuleNotFoundError: No module named 'torch'" in blocked.stderr  # it can fail
    p = without_pytorch(
        "import liverus.cli, liverus.predict, liverus.explain, liverus.serve.app, liverus.engine.onnx_runner\n"
        "from liverus.models import ModelCard\n"
        "from liverus.engine.predictor import Predictor\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('torch', 'torchvision', 'timm')))\n"
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"


def test_what_needs_pytorch_says_so_and_how_to_install_it(tmp_path):
    image = tmp_path / "scan.png"
    cv2.imwrite(str(image), np.full((64, 64), 90, np.uint8))
    # A model.pt is refused before it is read: the message names it (whether or not the file exists).
    p = without_pytorch(CLI, "predict", image, "--model", tmp_path / "model.pt", "--out", tmp_path / "p.csv")
    _clear_pytorch_error(p, "the PyTorch model", "model.pt", "liverus export")
    assert not (tmp_path / "p.csv").exists()
    # Commands that are PyTorch throughout name themselves.
    p = without_pytorch(CLI, "export", tmp_path / "model.pt", "--out", tmp_path / "m.onnx")
    _clear_pytorch_error(p, "liverus export needs PyTorch")


def test_commands_outside_the_onnx_install_say_what_to_install(phantom_dir, tmp_path):
    # `data audit` needs scikit-learn, which the ONNX-only install leaves out.
    p = without_pytorch(CLI, "data", "audit", phantom_dir)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "liverus data needs the package scikit-learn" in p.stderr and "requirements.lock" in p.stderr, p.stderr
    # Training says PyTorch first, not the first lesser package it would import.
    p = without_pytorch(CLI, "train", "--config", ROOT / "configs" / "demo.yaml", "--out", tmp_path / "run")
    _clear_pytorch_error(p, "liverus train needs PyTorch")
    assert not (tmp_path / "run").exists()


def test_only_the_packages_the_onnx_install_leaves_out_get_the_one_line_error(monkeypatch, capsys):
    import argparse

    import liverus.cli as cli

    def failing(missing: str):
        def command(args) -> int:
            raise ModuleNotFoundError(f"No module named {missing!r}", name=missing)

        return command

    parser = argparse.ArgumentParser()
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--max-pixels", type=int)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.set_defaults(func=failing("sklearn.metrics"), command="evaluate")
    # scikit-learn is installed here: a missing part of it (a moved submodule) is a fault, shown in full ...
    with pytest.raises(ModuleNotFoundError, match="sklearn.metrics"):
        cli.main([])
    # ... and where the package itself is absent, as in the ONNX-only install, one line says what to install.
    monkeypatch.setattr(cli, "_installed", lambda package: package != "sklearn")
    assert cli.main([]) == 2
    assert "liverus evaluate needs the package scikit-learn" in capsys.readouterr().err
    # A module liverus does not declare is a fault: shown in full, not dressed up as an install problem.
    parser.set_defaults(func=failing("not_a_liverus_dependency"))
    with pytest.raises(ModuleNotFoundError, match="not_a_liverus_dependency"):
        cli.main([])


def test_full_install_only_names_each_package_the_onnx_install_leaves_out():
    from importlib.metadata import packages_distributions

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    declared = {name(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    wanted = [line.strip() for line in (ROOT / "requirements-onnx.in").read_text().splitlines()]
    left_out = declared - {name(w) for w in wanted if w and not w.startswith(("#", "-"))}
    assert set(FULL_INSTALL_ONLY.values()) == left_out
    # Each key is what its distribution installs (as this environment, the full install, has it).
    provides = packages_distributions()
    for module, dist in FULL_INSTALL_ONLY.items():
        assert dist in {d.lower() for d in provides.get(module, [])}, (module, dist)
    assert set(FULL_INSTALL_ONLY) >= TORCH_PACKAGES


def test_the_onnx_lock_pins_what_the_full_lock_pins_and_holds_no_pytorch():
    def pins(path: Path) -> dict[str, str]:
        found = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), flags=re.MULTILINE)
        return {name.lower().replace("_", "-"): version for name, version in found}

    full, onnx = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-onnx.lock")
    assert {"onnxruntime", "numpy", "opencv-python-headless", "scikit-image", "fastapi", "uvicorn"} <= set(onnx)
    assert {name: full.get(name) for name in onnx} == onnx  # the same versions the full install is tested with
    assert not {"torch", "torchvision", "timm", "captum", "grad-cam", "albumentations"} & set(onnx)
    # The input file's ranges are pyproject.toml's (a range changed there is changed here).
    declared = {
        re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower(): d
        for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    }
    wanted = [line.strip() for line in (ROOT / "requirements-onnx.in").read_text().splitlines()]
    wanted = [w for w in wanted if w and not w.startswith(("#", "-"))]
    assert wanted and all(declared[re.split(r"[<>=!~ ]", w, maxsplit=1)[0].lower()] == w for w in wanted)


# ---------------------------------------------------------------- slow: a CNN and a feature model, exported


@pytest.fixture(scope="module")
def cnn_onnx(tmp_path_factory) -> Path:
    """A CNN on the whole scan, exported: an ImageNet backbone (EfficientNet-Lite0, shipped with its package) and a
    random head, saved as a model.pt of its own. Its answers differ between images (those of the one-epoch model of
    the shared ``onnx_file``, and of a random backbone, do not), so a comparison of answers can fail."""
    import torch

    from liverus.data import PreprocessConfig
    from liverus.export import export_onnx
    from liverus.models import build_model, default_card, save_model

    torch.manual_seed(0)
    model = build_model("baseline_efficientnet_lite0", weights="imagenet").eval()
    card = default_card(model).replace(preprocess=PreprocessConfig(image_size=64), operating_points={"youden": 0.5})
    out = tmp_path_factory.mktemp("cnn_onnx")
    save_model(model, out / "model.pt", card)
    export_onnx(out / "model.pt", out / "model.onnx")
    return out / "model.onnx"


@pytest.fixture(scope="module")
def feature_onnx(tmp_path_factory) -> Path:
    """A small feature model (radiomics + frozen EfficientNet-Lite0 of the lesion crop and the whole scan, an SVM;
    two boxes averaged) trained on the phantom and exported: its graph takes ``image`` and ``radiomics``."""
    from liverus.export import export_onnx
    from liverus.training import apply_overrides, load_config, train

    out = tmp_path_factory.mktemp("feature_onnx")
    cfg = apply_overrides(load_config(), [
        "data.image_size=64", "data.crop=roi", "data.lesion_channel=true", "data.scan_view=true",
        "data.box_average=2", "data.phantom_patients=16", "data.phantom_size=96", "data.augment=none",
        "model.name=radiomics_svm_efficientnet_lite0", "runtime.progress=false", "runtime.tensorboard=false",
    ])  # fmt: skip
    train(cfg, out / "run")
    info = export_onnx(out / "run" / "model.pt", out / "model.onnx")
    assert "radiomics" in info
    return out / "model.onnx"


def _cases(phantom: Path, n: int, *, lesions: bool) -> list[dict]:
    """``n`` phantom images; for lesion models half with their mask and half with the box around it."""
    rows = list(csv.DictReader((phantom / "manifest.csv").read_text().splitlines()))[::3][:n]
    cases = []
    for i, row in enumerate(rows):
        case = {"path": str(phantom / row["path"])}
        if lesions and i % 2 == 0:
            case["mask"] = str(phantom / row["mask"])
        elif lesions:
            ys, xs = np.nonzero(cv2.imread(str(phantom / row["mask"]), cv2.IMREAD_GRAYSCALE))
            case["box"] = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        cases.append(case)
    return cases


def prepared(pred, cases: list[dict]) -> list:
    """``cases`` prepared for ``pred`` (image, and the mask or box a case gives). Also run in the interpreter without
    PyTorch (PREDICTOR_AND_SERVICE imports it from this file), so that both sides prepare alike."""
    from liverus.data import read_image, read_mask

    pre = []
    for case in cases:
        image = read_image(case["path"])
        lesion = read_mask(case["mask"], image.shape) if case.get("mask") else None
        pre.append(pred.prepare(image, lesion=lesion, box=tuple(case["box"]) if case.get("box") else None))
    return pre


def _manifest(cases: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "mask", "box"])
        w.writeheader()
        w.writerows({**c, "box": ",".join(map(str, c.get("box", [])))} for c in cases)
    return path


@pytest.mark.parametrize("kind", ["cnn", "feature"])
def test_predict_and_serve_an_onnx_export_without_pytorch_answer_as_with_it(kind, phantom_dir, request, tmp_path):
    from liverus.cli import main
    from liverus.engine.predictor import Predictor

    model = request.getfixturevalue(f"{kind}_onnx")
    phantom = phantom_dir if kind == "cnn" else model.parent / "run" / "phantom"
    cases = _cases(phantom, 6, lesions=kind == "feature")
    manifest = _manifest(cases, tmp_path / "manifest.csv")

    # The command line: every column as with PyTorch installed (the same export, in this process).
    p = without_pytorch(CLI, "predict", manifest, "--model", model, "--out", tmp_path / "without.csv")
    assert p.returncode == 0, p.stderr
    assert main(["-q", "predict", str(manifest), "--model", str(model), "--out", str(tmp_path / "with.csv")]) == 0
    without, with_ = (
        list(csv.DictReader((tmp_path / f).read_text().splitlines())) for f in ("without.csv", "with.csv")
    )
    assert len(without) == len(cases) and all(r["status"] == "ok" for r in without)
    assert list(without[0]) == list(with_[0])
    for a, b in zip(without, with_, strict=True):
        assert {k: v for k, v in a.items() if k != "p_malignant"} == {k: v for k, v in b.items() if k != "p_malignant"}
        assert abs(round(float(a["p_malignant"]) * 1e6) - round(float(b["p_malignant"]) * 1e6)) <= 1  # 6 decimals
    if kind == "feature":
        assert {r["lesion_source"] for r in without} == {"user mask", "user box, averaged over 2 boxes"}

    # The predictor's own probabilities and the web service's answer.
    p = without_pytorch(PREDICTOR_AND_SERVICE, model, json.dumps(cases), Path(__file__).parent)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    pred = Predictor.from_path(model)
    want = pred.probabilities(prepared(pred, cases))
    assert want.std() > 1e-4  # answers that differ between images, so the comparison can fail
    np.testing.assert_allclose(got["p"], want, rtol=0, atol=1e-6)
    assert got["backend"] == "onnxruntime" and got["health"]["backend"] == "onnxruntime"
    assert got["health"]["maps"] == [] and got["health"]["needs_box"] == (kind == "feature")
    api = got["api"]
    one = next(i for i, c in enumerate(cases) if not c.get("mask"))
    assert api["status"] == 200 and "heatmap" not in api and api["label"] == pred.card.label(want[one])
    assert api["probability_malignant"] == pytest.approx(want[one], abs=1e-6)


def test_options_that_need_pytorch_say_so_without_it(cnn_onnx, phantom_dir, tmp_path):
    image, pt = _cases(phantom_dir, 1, lesions=False)[0]["path"], cnn_onnx.with_suffix(".pt")
    p = without_pytorch(CLI, "predict", image, "--model", cnn_onnx, "--segmenter", pt, "--out", tmp_path / "p.csv")
    _clear_pytorch_error(p, "lesion segmenter", "--segmenter")
    p = without_pytorch(CLI, "predict", image, "--model", cnn_onnx, "--heatmaps", tmp_path / "maps",
                        "--out", tmp_path / "p.csv")  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr and "--heatmaps needs the PyTorch model.pt" in p.stderr
    p = without_pytorch(CLI, "explain", image, "--model", pt, "--out", tmp_path / "maps")
    _clear_pytorch_error(p, "the PyTorch model")
    p = without_pytorch(CLI, "serve", "--model", cnn_onnx, "--segmenter", pt)
    _clear_pytorch_error(p, "lesion segmenter")
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "maps").exists()
