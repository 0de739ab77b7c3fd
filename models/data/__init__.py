"""Synthetic data for training and testing the demo models (no downloads needed)."""

from models.data.synthetic import (
    CLASSES,
    LABELS_FILE,
    SPLIT_BASE,
    MotionShapes,
    labels,
    make_clip,
    make_flow_pair,
    split_seed,
)

__all__ = [
    "CLASSES",
    "LABELS_FILE",
    "SPLIT_BASE",
    "MotionShapes",
    "labels",
    "make_clip",
    "make_flow_pair",
    "split_seed",
]
