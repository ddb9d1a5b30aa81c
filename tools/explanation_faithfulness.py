"""Faithfulness of every map on cross-validation folds: each member of an ensemble run (``model.ensemble: K``) is
checked on its own held-out fold, the development images it never saw.

    python tools/explanation_faithfulness.py RUN --data DATA [--cases 60] [--out faithfulness.json]

For each map the model has (occlusion of the lesion crop and, with ``--all-views``, of the whole scan; Grad-CAM;
spatial attention) it prints the deletion and insertion areas, their difference, and that difference's margin over
random maps of the same images with a 95% bootstrap interval (liverus.evaluation.faithfulness), plus Grad-CAM's
pointing game against the experts' masks. docs/explanation.md quotes its output for the recommended model on AUL.
"""

from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

from liverus.data.audit import load_task_cases
from liverus.evaluation.faithfulness import (
    deletion_insertion_for_model,
    faithfulness_for_model,
    summarize_deletion_insertion,
)
from liverus.utils import atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import cpu_name  # noqa: E402  (the benchmarks' CPU description)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an ensemble run folder (RUN/members/member*/model.pt)")
    parser.add_argument("--data", required=True, help="the dataset the run was trained on")
    parser.add_argument("--cases", type=int, default=60, help="held-out cases in all, spread over the members")
    parser.add_argument("--all-views", action="store_true", help="also the occlusion map of the whole scan")
    parser.add_argument("--out", help="JSON file for the per-case scores and the summary")
    args = parser.parse_args(argv)
    members = sorted(Path(args.run).glob("members/member*/model.pt"))
    if not members:
        print(f"{args.run} has no members/member*/model.pt: train with model.ensemble: 2 or more", file=sys.stderr)
        return 2
    cases = {c.path: c for c in load_task_cases(args.data, "binary", "source")[0]}
    start = time.time()
    parts, pointing = [], []
    for i, model in enumerate(members):
        with open(model.parent / "predictions_val.csv") as fh:
            held = [cases[row["path"]] for row in csv.DictReader(fh) if row["path"] in cases]
        per_member = max(1, args.cases // len(members))
        parts.append(deletion_insertion_for_model(model, held, max_cases=per_member, seed=i, all_views=args.all_views))
        pointing.append(faithfulness_for_model(model, held, max_cases=per_member, seed=i))
        print(f"member {i}: {len(parts[-1]['cases'])} held-out cases, {time.time() - start:.0f} s", file=sys.stderr)
    summary = summarize_deletion_insertion(parts)
    print(f"{len(parts)} members, held-out folds; CPU: {cpu_name()}; {time.strftime('%Y-%m-%d')}; "
          f"{time.time() - start:.0f} s")  # fmt: skip
    print("| map | cases | deletion (lower better) | insertion (higher better) | insertion - deletion | "
          "margin over random maps [95% CI] | beats random |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for method, r in summary.items():
        low, high = r["margin_ci95"]
        print(
            f"| {method} | {r['n']} | {r['deletion']:.3f} (random {r['random_deletion']:.3f}) | "
            f"{r['insertion']:.3f} (random {r['random_insertion']:.3f}) | {r['score']:.3f} | "
            f"{r['margin_over_random']:+.3f} [{low:+.3f}, {high:+.3f}] | {'yes' if r['beats_random'] else 'no'} |"
        )
    cams = [p["gradcam"] for p in pointing if p.get("gradcam") and p["gradcam"]["n"]]
    if cams:
        n = sum(c["n"] for c in cams)
        game = sum(c["pointing_game"] * c["n"] for c in cams) / n
        area = sum(c["lesion_area"] * c["n"] for c in cams) / n
        print(f"Grad-CAM pointing game {game:.2f} on {n} cases (lesion area, the chance level: {area:.2f})")
    if args.out:
        atomic_write_json(args.out, {"summary": summary, "members": parts, "pointing_game": pointing,
                                     "cpu": cpu_name(), "python": platform.python_version()})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
