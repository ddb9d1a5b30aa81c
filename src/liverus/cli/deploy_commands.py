"""``liverus predict``, ``explain``, ``serve`` and ``export``."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def cmd_predict(args: argparse.Namespace) -> int:
    from liverus.predict import run_predict

    return run_predict(args)


def cmd_explain(args: argparse.Namespace) -> int:
    from liverus.explain import run_explain

    return run_explain(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from liverus.serve.app import run_server

    return run_server(args)


def cmd_export(args: argparse.Namespace) -> int:
    from liverus.export import export_onnx

    summary = export_onnx(
        args.checkpoint, args.out, opset=args.opset, quantize=args.quantize, calibration=args.calibration,
        holdout=args.holdout, max_auc_change=args.max_auc_change,
    )  # fmt: skip
    print(json.dumps(summary, indent=2))
    return 0


MAPS = ("default", "occlusion", "occlusion_views", "gradcam", "attention")
MAP_HELP = (
    "the map: default = occlusion of the lesion crop for feature models (radiomics_*), Grad-CAM for CNNs; "
    "occlusion_views: occlusion of every view (the whole scan too)"
)


def _lesion_options(p: argparse.ArgumentParser) -> None:
    """Where the lesion of a single input is (predict, explain)."""
    p.add_argument("--mask", help="lesion mask (single input) for lesion models (crop=roi or mask channel)")
    p.add_argument(
        "--box", help="lesion box x0,y0,x1,y1 in pixels (single input) for lesion models; may start with a minus sign"
    )
    p.add_argument(
        "--segmenter", help="lesion segmenter model.pt (liverus segment train): finds the lesion where none is given"
    )
    _box_average_option(p)


def _box_average_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--box-average",
        type=int,
        metavar="K",
        help="lesion models given a box: average the probability over K boxes around it (default: the model's, "
        "data.box_average when it was trained)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="probability of malignancy for images, folders or DICOM")
    p.add_argument(
        "inputs", nargs="+", help="image files, folders, DICOM files, or manifest CSVs (path plus mask or box columns)"
    )
    p.add_argument("--model", required=True, help="model.pt of a run, or an exported .onnx file")
    p.add_argument("--out", required=True, help="output .csv or .json")
    p.add_argument(
        "--heatmaps",
        help="folder for one map figure per image (STEM_METHOD.png; feature models also STEM_features.png, the "
        "contributions chart)",
    )
    p.add_argument("--heatmap-method", choices=MAPS, default="default", help=MAP_HELP)
    _lesion_options(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--skip-bad", action="store_true", help="list unreadable files and go on (they are always listed)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "explain",
        help="maps of what raised or lowered the score (occlusion, Grad-CAM, spatial attention) overlaid on images; "
        "for feature models (radiomics_*) also each feature group's contribution to the score",
    )
    p.add_argument("inputs", nargs="+", help="image files, folders, DICOM files, or manifest CSVs (path, mask, box)")
    p.add_argument("--model", required=True, help="model.pt of a run")
    p.add_argument("--out", required=True, help="folder for the PNG figures (and STEM_features.json of feature models)")
    p.add_argument("--method", choices=[*MAPS, "all"], default="default", help=MAP_HELP + "; all: every map it has")
    _lesion_options(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("serve", help="web page and REST API for radiologists (research use only)")
    p.add_argument("--model", required=True, help="model.pt of a run, or an exported .onnx file")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest upload accepted (default 20 MB)")
    p.add_argument("--api-docs", action="store_true", help="also serve /docs and /openapi.json (off by default)")
    p.add_argument("--segmenter", help="lesion segmenter model.pt: the page proposes a lesion box to accept or redraw")
    _box_average_option(p)
    p.add_argument("--max-batch", type=int, default=16, help="dynamic batching: largest batch (1 disables; default 16)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="dynamic batching: how long a batch waits (default 5 ms)"
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export", help="export a trained model to ONNX (with preprocessing and threshold metadata)")
    p.add_argument("checkpoint")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--quantize", choices=["int8"], help="static int8 quantization (ONNX Runtime), AUC-checked")
    p.add_argument("--calibration", help="int8: training images to calibrate on (default: the run's training part)")
    p.add_argument("--holdout", help="int8: labelled images to check the AUC on (default: the run's validation part)")
    p.add_argument("--max-auc-change", type=float, default=0.005, help="int8: largest held-out AUC change allowed")
    p.set_defaults(func=cmd_export)
