"""The data side of a run: its cases, its group-disjoint split and its loaders."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader

from liverus.data import (
    Case,
    CaseCache,
    DataError,
    PreprocessConfig,
    UltrasoundDataset,
    any_box_only,
    box_variants,
    build_train_transform,
    check_disjoint,
    default_cache_dir,
    lesion_source_counts,
    load_splits,
    load_task_cases,
    make_phantom_dataset,
    prepare_cases,
    save_splits,
    select_task,
    train_val_test_split,
)
from liverus.data.audit import case_size, derived_columns, size_groups
from liverus.engine.forward import eval_batch_size
from liverus.models import is_feature_model
from liverus.training.config import TrainConfig
from liverus.training.distributed import DistInfo, ShardedBatchSampler, barrier
from liverus.training.run_folder import RunFolder

__all__ = [
    "RunData",
    "resolve_cases",
    "prepare_run_data",
    "cache_dir",
    "log_skipped",
    "usable_cases",
    "acquisition_group",
    "acquisition_groups",
    "balancing_weights",
]

log = logging.getLogger(__name__)


def resolve_cases(cfg: TrainConfig, run_dir: str | Path, info: DistInfo | None = None) -> list[Case]:
    """The task's cases: from ``data.source``, or a phantom written once into ``run_dir/phantom``."""
    info = info or DistInfo()
    source = cfg.data.source
    if not source:
        source = Path(run_dir) / "phantom"
        if info.is_main and not (source / "manifest.csv").is_file():
            make_phantom_dataset(
                source,
                n_patients=cfg.data.phantom_patients,
                size=cfg.data.phantom_size,
                seed=cfg.runtime.seed,
                include_normal=cfg.data.task == "three_class",
            )
        barrier(info)
    cases, conflicts = load_task_cases(source, cfg.data.task, cfg.data.group_by)
    check_lesions(cfg, cases)
    if cfg.data.group_by != "source":
        log.info("grouped by %s: %d groups", cfg.data.group_by, len({c.group_key for c in cases}))
    for c in conflicts:
        log.warning(
            "near duplicates with different labels: %s (%s) and %s (%s), correlation %.3f",
            c["a"], c["label_a"], c["b"], c["label_b"], c["correlation"],
        )  # fmt: skip
    return cases


def check_lesions(cfg: TrainConfig, cases: list[Case]) -> None:
    """Say where a lesion model's lesions come from (masks, boxes alone), and stop before any work when some image
    has neither, naming the fix.

    Raises:
        DataError: naming the first image without a lesion (unless ``data.skip_bad`` leaves such images out).
    """
    if cfg.data.crop != "roi" and not cfg.data.lesion_channel:
        return
    counts = lesion_source_counts(cases)
    if counts.get("box"):
        log.info(
            "lesions: %d from masks, %d from boxes alone (outlined inside the box by %s, as at inference)",
            counts.get("mask", 0), counts["box"], cfg.data.box_mask,
        )  # fmt: skip
    missing = [c for c in cases if c.label != "normal" and c.lesion_source == "none"]
    if missing and not cfg.data.skip_bad:
        raise DataError(
            missing[0].path,
            f"has neither a lesion mask nor a box ({len(missing)} of {len(cases)} images): a lesion model "
            "(data.crop: roi or data.lesion_channel) needs one; add a mask or a box column (x0,y0,x1,y1) to the "
            "manifest, or set data.skip_bad: true to leave such images out (they are listed)",
        )


def cache_dir(cfg: TrainConfig, folder: str | Path) -> Path | None:
    """``data.cache_dir``; ``memory`` for no disk cache; empty for the default inside ``folder`` (a run or study)."""
    if cfg.data.cache_dir == "memory":
        return None
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(folder)


@dataclass
class RunData:
    """A run's classes, cache, parts (``train``, ``val``, optional ``test``) and their loaders."""

    classes: tuple[str, ...]
    cache: CaseCache
    parts: dict[str, list[Case]]
    train_loader: DataLoader
    train_sampler: ShardedBatchSampler
    train_targets: list[int]
    dist: DistInfo
    num_workers: int = 0
    pin_memory: bool = False
    n_groups: int = 0  # acquisition groups in the training part (loss.debias_by)
    train_weights: list[float] | None = None  # balancing_weights of the training part (sampler; feature-model fit)
    # The test part's, one per averaged box, when data.test_lesion_from or data.box_average score it another way.
    test_caches: list[CaseCache] | None = None
    # The training part's box-derived copies (data.box_copies; feature models fit on them too).
    train_box_caches: list[CaseCache] | None = None

    @property
    def test_loaders(self) -> list[DataLoader]:
        """The test part's :meth:`eval_loader`, preprocessed as ``data.test_lesion_from`` says: one per box its
        probabilities are averaged over (``data.box_average``)."""
        return [self.eval_loader(self.test, cache) for cache in self.test_caches or [None]]

    @property
    def train(self) -> list[Case]:
        return self.parts["train"]

    @property
    def val(self) -> list[Case]:
        return self.parts["val"]

    @property
    def test(self) -> list[Case]:
        return self.parts.get("test", [])

    def eval_loader(self, cases: list[Case], cache: CaseCache | None = None) -> DataLoader:
        """Unaugmented batches of :func:`~liverus.engine.forward.eval_batch_size`, this rank's share of them (from
        ``cache``, default the run's)."""
        ds = UltrasoundDataset(cases, self.classes, cache or self.cache, None)
        sampler = ShardedBatchSampler(
            len(ds),
            eval_batch_size(self.dist.world_size),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            shuffle=False,
            drop_last=False,
        )
        return DataLoader(ds, batch_sampler=sampler, num_workers=self.num_workers, pin_memory=self.pin_memory)


def _choose_split(cfg: TrainConfig, folder: RunFolder, cases: list[Case]) -> dict[str, list[str]]:
    if folder.splits_file.is_file():
        return load_splits(folder.splits_file, cases)["folds"][0]
    if cfg.data.splits:
        folds = load_splits(cfg.data.splits, cases)["folds"]
        if cfg.data.fold >= len(folds):
            raise DataError(cfg.data.splits, f"has {len(folds)} folds; data.fold={cfg.data.fold} does not exist")
        return folds[cfg.data.fold]
    return train_val_test_split(cases, cfg.data.val_fraction, 0.0, seed=cfg.runtime.seed)  # val_fraction 0: every case


def acquisition_group(case: Case, column: str) -> str:
    """A case's acquisition group from a manifest ``column`` (or one derived from it), or for ``image_size`` the
    original image's WxH (AUL's manifest records it; other data is read from the file header). The dataset-wide
    ``size_group`` needs every case: see :func:`acquisition_groups`.

    Raises:
        DataError: naming the image when the manifest has no such column.
    """
    if column == "image_size":
        w, h = case_size(case)
        return f"{w}x{h}"
    meta = derived_columns(case.meta)
    if column not in meta:
        raise DataError(
            case.path,
            f"has no {column!r} column for data.balance_by / loss.debias_by (columns: {sorted(meta)}); "
            "size_group (groups from the image sizes) works on every dataset",
        )
    return str(meta[column])


def acquisition_groups(cases: list[Case], column: str) -> list[str]:
    """Every case's acquisition group: ``size_group`` (from the image sizes of these cases, any dataset; see
    :func:`liverus.data.audit.size_groups`: on AUL 1024x768 against the other sizes), ``image_size`` (WxH) or a
    manifest column.

    Raises:
        DataError: naming the image when the manifest has no such column, or a file whose size cannot be read.
    """
    if column == "size_group":
        return size_groups([case_size(c) for c in cases])
    return [acquisition_group(c, column) for c in cases]


SMALL_CELL = 5  # below this many training cases a balanced cell's few cases dominate (they are drawn/weighed most)


def balancing_weights(
    cfg: TrainConfig, cases: list[Case], targets: list[int], *, log_cells: bool = False
) -> list[float] | None:
    """Per-case weights ``1 / (cases in its cell)``, so every cell weighs the same in total: the cells are class x
    acquisition group with ``data.balance_by`` (the scanner cannot stand in for the class), the classes with
    ``loss.balanced_sampler``. A CNN draws its batches with these weights; a fitted feature model weighs its
    classifier's loss with them. None when neither option is set.

    Raises:
        DataError: naming the image whose manifest lacks the ``data.balance_by`` column.
    """
    if cfg.data.balance_by:
        cells = list(zip(targets, acquisition_groups(cases, cfg.data.balance_by), strict=True))
    elif cfg.loss.balanced_sampler:
        cells = list(targets)
    else:
        return None
    counts = Counter(cells)
    if log_cells and cfg.data.balance_by:
        log.info("balanced over class x %s: %s", cfg.data.balance_by, dict(sorted(counts.items())))
        small = sorted(cell for cell, n in counts.items() if n < SMALL_CELL)
        if small:
            log.warning(
                "data.balance_by=%s: %d of %d class x group cells hold fewer than %d training cases (%s), so each of "
                "their cases weighs up to %.0f times a case of the largest cell; a coarser grouping column balances "
                "more stably (size_group: the most common image size against the rest)",
                cfg.data.balance_by, len(small), len(counts), SMALL_CELL, ", ".join(map(str, small[:4])),
                max(counts.values()) / min(counts.values()),
            )  # fmt: skip
    return [1.0 / counts[cell] for cell in cells]


def log_skipped(skipped: list[tuple[str, str]], where: Path) -> None:
    log.warning("skipped %d bad file(s) (listed in %s):", len(skipped), where)
    for p, q in skipped:
        log.warning("  %s: %s", p, q)


def usable_cases(cfg: TrainConfig, folder: str | Path, cases: list[Case] | None = None) -> tuple[list[Case], CaseCache]:
    """The cases of a study or ensemble folder, decoded once into its cache; with ``data.skip_bad`` the bad files are
    listed once (``FOLDER/skipped.json``) rather than by every run inside it.

    Returns:
        ``(usable cases, the filled cache)``.
    """
    cases = cases if cases is not None else resolve_cases(cfg, folder)
    cache = CaseCache(cfg.data.preprocess(), cache_dir(cfg, folder))
    cases, skipped = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
    if skipped:
        log_skipped(skipped, RunFolder(folder).write_skipped(skipped))
    return cases, cache


def prepare_run_data(
    cfg: TrainConfig,
    folder: RunFolder,
    info: DistInfo,
    *,
    cases: list[Case] | None = None,
    split: dict[str, list[str]] | None = None,
    pin_memory: bool = False,
) -> RunData:
    """Load and check the cases (listing skipped files), fix the split (saved as ``splits.json``) and build loaders.

    Raises:
        DataError: for bad data, a leaking split or an empty part.
    """
    if cases is None:
        cases = resolve_cases(cfg, folder.path, info)
    _, classes = select_task([], cfg.data.task)
    cache = CaseCache(cfg.data.preprocess(), cache_dir(cfg, folder.path))
    cases = _decoded_cases(cfg, folder, info, cases, cache)
    parts = _run_parts(cfg, folder, info, cases, split)
    train = _training_loader(cfg, info, parts["train"], classes, cache, pin_memory)
    return RunData(
        classes,
        cache,
        parts,
        train.loader,
        train.sampler,
        train.targets,
        info,
        cfg.data.num_workers,
        pin_memory,
        n_groups=train.n_groups,
        train_weights=train.weights,
        test_caches=held_out_caches(cfg, folder.path, parts.get("test", []), info),
        train_box_caches=box_copy_caches(cfg, folder.path, parts["train"], info),
    )


def _decoded_cases(
    cfg: TrainConfig, folder: RunFolder, info: DistInfo, cases: list[Case], cache: CaseCache
) -> list[Case]:
    """The usable cases, decoded into ``cache``; skipped files are listed once, by rank 0."""
    if info.is_main:
        cases, skipped = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
        if skipped:
            log_skipped(skipped, folder.write_skipped(skipped))
    barrier(info)
    if not info.is_main:  # after rank 0, so that the other ranks read the files it decoded
        cases, _ = prepare_cases(cases, cache, skip_bad=cfg.data.skip_bad)
    return cases


def _run_parts(
    cfg: TrainConfig, folder: RunFolder, info: DistInfo, cases: list[Case], split: dict[str, list[str]] | None
) -> dict[str, list[Case]]:
    """The run's parts (``train``, ``val``, optional ``test``) as cases, checked group-disjoint and saved as
    ``splits.json`` the first time.

    Raises:
        DataError: for a leaking split, or a part the run cannot do without.
    """
    split = split or _choose_split(cfg, folder, cases)
    by_path = {c.path: c for c in cases}
    parts = {k: [by_path[p] for p in v if p in by_path] for k, v in split.items()}
    check_disjoint(cases, {k: [c.path for c in v] for k, v in parts.items()})
    if info.is_main and not folder.splits_file.is_file():
        save_splits(folder.splits_file, {"folds": [{k: [c.path for c in v] for k, v in parts.items()}]})
    if (
        not parts["val"]
        and cfg.model.threshold is None
        and not is_feature_model(cfg.model.name)
        and cfg.data.task == "binary"
    ):
        raise DataError(None, "no validation cases: set model.threshold to train without validation")
    if not parts["train"]:
        raise DataError(None, f"empty split: {len(parts['train'])} training and {len(parts['val'])} validation cases")
    return parts


@dataclass
class _TrainingLoader:
    """The training part's loader with its sampler and what else the run reads off the training cases."""

    loader: DataLoader
    sampler: ShardedBatchSampler
    targets: list[int]
    weights: list[float] | None
    n_groups: int


def _training_loader(
    cfg: TrainConfig, info: DistInfo, train: list[Case], classes: tuple[str, ...], cache: CaseCache, pin_memory: bool
) -> _TrainingLoader:
    """Augmented, seeded batches of the training part, this rank's share of each global batch, drawn with the
    balancing weights when ``data.balance_by`` or ``loss.balanced_sampler`` asks for them."""
    group_ids, n_groups = None, 0
    if cfg.loss.debias_by:
        names = acquisition_groups(train, cfg.loss.debias_by)
        index = {g: i for i, g in enumerate(sorted(set(names)))}
        group_ids, n_groups = [index[g] for g in names], len(index)
    train_ds = UltrasoundDataset(
        train,
        classes,
        cache,
        build_train_transform(cfg.data.augment),
        seed=cfg.runtime.seed,
        with_lesion=cfg.loss.attention_weight > 0 or cfg.loss.segmentation_weight > 0,
        groups=group_ids,
    )
    targets = list(train_ds.targets)
    weights = balancing_weights(cfg, train, targets, log_cells=info.is_main)
    gbs = cfg.optim.batch_size
    if len(train_ds) < gbs:  # a small training part still gives one batch that divides among the ranks
        gbs = max(info.world_size, (len(train_ds) // info.world_size) * info.world_size)
    sampler = ShardedBatchSampler(
        len(train_ds),
        gbs,
        seed=cfg.runtime.seed,
        rank=info.rank,
        world_size=info.world_size,
        shuffle=True,
        drop_last=True,
        weights=weights,
    )
    loader = DataLoader(
        train_ds,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=pin_memory,
        persistent_workers=cfg.data.num_workers > 0,
    )
    return _TrainingLoader(loader, sampler, targets, weights, n_groups)


def held_out_caches(
    cfg: TrainConfig, folder: str | Path, test: list[Case], info: DistInfo | None = None
) -> list[CaseCache] | None:
    """The caches the held-out ``test`` cases are scored from when ``data.test_lesion_from`` gives their lesion
    another way than training had it, one per box their probability is averaged over (``data.box_average``); None
    when the run's own cache serves.

    Raises:
        DataError: naming a test image whose lesion cannot be given that way.
    """
    test_pre = cfg.data.test_preprocess()
    # Box-only cases are scored as a user's box is at inference: averaged over data.box_average boxes.
    variants = box_variants(test_pre, from_box=test_pre.lesion_from == "box" or any_box_only(test))
    if not test or variants == (cfg.data.preprocess(),):
        return None
    how = f"data.test_lesion_from={cfg.data.test_lesion_from or cfg.data.lesion_from}"
    return _filled_caches(cfg, folder, variants, test, info, f"cannot be scored with {how}")


def box_copy_caches(
    cfg: TrainConfig, folder: str | Path, train: list[Case], info: DistInfo | None = None
) -> list[CaseCache] | None:
    """The caches of the ``data.box_copies`` box-derived copies of the training cases (a feature model fits on the
    cases as ``data.lesion_from`` gives them and on these): copy 0 is the box around the mask with each edge moved by
    up to ``data.box_copy_jitter`` (seeded per image), copy ``k`` that box with each edge moved by up to
    ``data.box_shift`` more (the ``k``-th averaged box), so with ``data.box_jitter`` equal to ``box_copy_jitter`` the
    copies share the test part's cache files. The copies' jitter is their own setting, so a model trained with
    copies keeps ``box_jitter`` (which its card carries into ``evaluate --lesion-from box``) as chosen. None without
    copies.

    Raises:
        DataError: naming a training image whose lesion cannot be given by a box.
    """
    if not cfg.data.box_copies or not train:
        return None
    boxed = dataclasses.replace(
        cfg.data.preprocess(), lesion_from="box", box_jitter=cfg.data.box_copy_jitter, box_average=cfg.data.box_copies
    )
    return _filled_caches(cfg, folder, box_variants(boxed), train, info, "cannot be given by a box (data.box_copies)")


def _filled_caches(
    cfg: TrainConfig,
    folder: str | Path,
    variants: tuple[PreprocessConfig, ...],
    cases: list[Case],
    info: DistInfo | None,
    problem_prefix: str,
) -> list[CaseCache]:
    """One cache per preprocessing in ``variants``, each filled with ``cases`` (by rank 0 first under DDP)."""
    caches = [CaseCache(pre, cache_dir(cfg, folder)) for pre in variants]

    def fill() -> None:
        for cache in caches:
            _, bad = prepare_cases(cases, cache, skip_bad=True)
            if bad:
                path, problem = bad[0]
                raise DataError(path, f"{problem_prefix}: {problem}")

    if info is None or info.is_main:
        fill()
    if info is not None:
        barrier(info)
        if not info.is_main:
            fill()  # from the files rank 0 wrote (or, for an in-memory cache, decoded again)
    return caches
