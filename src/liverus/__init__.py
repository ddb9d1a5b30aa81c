"""liverus: benign vs malignant focal liver lesion classification on B-mode ultrasound."""

__version__ = "0.1.0"
