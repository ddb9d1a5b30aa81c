"""Data: reading, case tables, preprocessing, augmentation, caching, splits, audit and the synthetic phantom."""

from liverus.data.audit import (
    apply_grouping,
    audit_cases,
    format_audit,
    load_task_cases,
    near_duplicate_groups,
    shortcut_check,
)
from liverus.data.augment import build_train_transform
from liverus.data.cases import (
    CLASS_SETS,
    Case,
    any_box_only,
    cases_from_aul_release,
    cases_from_folder,
    cases_from_manifest,
    lesion_source_counts,
    load_cases,
    select_task,
    write_manifest,
)
from liverus.data.dataset import (
    CaseCache,
    SegmentationDataset,
    UltrasoundDataset,
    clear_cache,
    default_cache_dir,
    load_preprocessed,
    prepare_cases,
)
from liverus.data.io import DataError, read_image, read_mask
from liverus.data.phantom import make_phantom_dataset, render_phantom
from liverus.data.preprocess import (
    PreprocessConfig,
    box_to_mask,
    box_variants,
    detect_scan_area,
    lesion_box,
    model_pixels,
    preprocess,
)
from liverus.data.splits import check_disjoint, kfold_splits, load_splits, save_splits, train_val_test_split

__all__ = [
    "any_box_only",
    "lesion_source_counts",
    "CLASS_SETS",
    "Case",
    "CaseCache",
    "DataError",
    "PreprocessConfig",
    "SegmentationDataset",
    "UltrasoundDataset",
    "apply_grouping",
    "audit_cases",
    "box_to_mask",
    "box_variants",
    "build_train_transform",
    "cases_from_aul_release",
    "cases_from_folder",
    "cases_from_manifest",
    "check_disjoint",
    "clear_cache",
    "default_cache_dir",
    "detect_scan_area",
    "format_audit",
    "kfold_splits",
    "lesion_box",
    "load_cases",
    "load_preprocessed",
    "load_task_cases",
    "load_splits",
    "make_phantom_dataset",
    "model_pixels",
    "near_duplicate_groups",
    "prepare_cases",
    "preprocess",
    "read_image",
    "read_mask",
    "render_phantom",
    "save_splits",
    "select_task",
    "shortcut_check",
    "train_val_test_split",
    "write_manifest",
]
