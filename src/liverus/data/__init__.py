"""Data: reading, case tables, preprocessing, augmentation, caching, splits, audit and the synthetic phantom."""

# The submodule and the function share a name: imported here, as before, so the package's ``preprocess`` is the
# function whichever import comes first (preprocessing is light: OpenCV and numpy).
from liverus.data.preprocess import (
    PreprocessConfig,
    box_to_mask,
    box_variants,
    detect_scan_area,
    lesion_box,
    model_pixels,
    preprocess,
)
from liverus.utils import lazy_exports

# Loaded when first used (see lazy_exports): a command imports only the submodules it needs.
_EXPORTS = {
    "audit": (
        "apply_grouping",
        "audit_cases",
        "format_audit",
        "load_task_cases",
        "near_duplicate_groups",
        "shortcut_check",
    ),
    "augment": ("build_train_transform",),
    "cases": (
        "CLASS_SETS",
        "Case",
        "any_box_only",
        "cases_from_aul_release",
        "cases_from_folder",
        "cases_from_manifest",
        "lesion_source_counts",
        "load_cases",
        "select_task",
        "write_manifest",
    ),
    "dataset": (
        "CaseCache",
        "SegmentationDataset",
        "UltrasoundDataset",
        "clear_cache",
        "default_cache_dir",
        "load_preprocessed",
        "prepare_cases",
    ),
    "io": (
        "DataError",
        "read_image",
        "read_mask",
    ),
    "phantom": (
        "make_phantom_dataset",
        "render_phantom",
    ),
    "splits": (
        "check_disjoint",
        "kfold_splits",
        "load_splits",
        "save_splits",
        "train_val_test_split",
    ),
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

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
