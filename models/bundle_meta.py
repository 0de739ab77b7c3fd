"""The model bundle's metadata (``bundle.json``): a plain-JSON contract with no torch import.

The API process reads labels, input geometry and defence defaults from here without loading any
weights (its image carries no torch); ``models.bundle.load`` adds the weight loading on top.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.defense_mode import resolve_policy
from models.errors import BundleError

BUNDLE_FILE = "bundle.json"
SHIPPED_BUNDLES = Path(__file__).resolve().parent / "bundles"
# The tools' default bundle (eval, calibrate, finetune, bench, bundle test, train-robust's source, a
# bare load_bundle()): MotionShapes v1.1, the paper's purification, which every measurement in
# docs/robustness.md and docs/demo-model.md is of.
DEFAULT_BUNDLE_DIR = SHIPPED_BUNDLES / "motionshapes-v1"
# The service's default model (what answers a request that names none; worker.settings.bundle_dir):
# the shipped bundle with the better measured worst case at clean accuracy >= 85 % (issue 23;
# docs/robust-model.md). The other shipped bundles are served by name from the same folder.
SERVED_BUNDLE_DIR = SHIPPED_BUNDLES / "motionshapes-robust-v1"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputSpec(_Strict):
    """How decoded video frames become the clips the models were trained on."""

    frames: int = Field(ge=2, description="frames per clip (T)")
    height: int = Field(ge=16)
    width: int = Field(ge=16)
    resize: Literal["short_side", "stretch"] = "short_side"
    crop: Literal["center"] = "center"


class FlowSpec(_Strict):
    arch: Literal["raft_small", "raft_large"] = "raft_small"
    checkpoint: str
    format: Literal["torchvision", "original"] = "torchvision"
    corr_levels: int | None = Field(default=None, ge=1, le=6)
    corr_radius: int | None = Field(default=None, ge=1, le=8)
    updates_grad: int = Field(default=2, ge=1, description="RAFT updates whenever a gradient is taken")
    updates_infer: int = Field(default=12, ge=1, description="RAFT updates for the final prediction")


class ClassifierSpec(_Strict):
    arch: Literal["i3d"] = "i3d"
    checkpoint: str
    width: float = Field(default=1.0, gt=0, le=1.0)
    num_classes: int = Field(ge=2)
    temporal_pool: Literal["port", "mean"] = Field(
        default="mean",
        description="head before the logits (models/nets/i3d.py): 'port' = the PyTorch I3D port's "
        "AvgPool3d([2,7,7], stride 1) then the mean, 'mean' = uniform average. `bundle create` writes "
        "'port' for imported checkpoints; the default keeps bundles written before the field existed "
        "(all trained with 'mean') computing what they computed",
    )


class FlowNormalisation(_Strict):
    """Classifier input = clamp(flow, -clamp, clamp) / scale, channel 0 horizontal unless 'yx'."""

    clamp: float = Field(default=20.0, gt=0)
    scale: float = Field(default=20.0, gt=0)
    channel_order: Literal["xy", "yx"] = "xy"


class DefenseSpec(_Strict):
    """The purification's settings (``models.defense.purify.DefenseConfig``; defaults: the paper's
    Algorithm 1) and when it runs: ``mode`` is the default of ``defend`` (``always``, ``auto``:
    only clips whose MC loss before the defence is above ``threshold``, or ``off``)."""

    steps: int = Field(default=20, ge=0)
    step_size: float = Field(default=2 / 255, gt=0)
    epsilon: float = Field(default=12 / 255, ge=0, le=1)
    lambda_smooth: float = Field(default=0.1, ge=0)
    edge_lambda: float = Field(default=150.0, ge=0)
    similarity: Literal["l1", "l2", "ssim"] = "l1"
    multi: bool = False
    mode: Literal["always", "auto", "off"] = Field(default="always", description="default of defend=")
    threshold: float | None = Field(
        default=None, gt=0, description="defend=auto purifies clips above this MC loss (None: the calibration's)"
    )
    keep_best: bool = Field(default=False, description="return each clip's lowest-MC-loss iterate")
    schedule: Literal["constant", "plateau", "cosine"] = "constant"
    patience: int = Field(default=2, ge=1, description="plateau schedule: steps without improvement before halving")
    stop_quantile: str | None = Field(
        default=None, description="stop a clip once its MC loss is under this calibration quantile (e.g. 'p50')"
    )
    random_start: float = Field(default=0.0, ge=0, le=1, description="x_0 uniform within this radius (<= epsilon)")
    restarts: int = Field(default=1, ge=1, description="purifications from random starts, probabilities averaged")
    evaluation: str | None = Field(default=None, description="the command whose table chose these settings")


class Calibration(_Strict):
    """Clean MC loss (before defence) on clean clips: quantiles, and the suspected-attack threshold."""

    n: int = Field(ge=1)
    quantiles: dict[str, float]
    mean: float
    std: float
    threshold: float
    threshold_quantile: float = 0.99
    sample: list[float] = Field(default_factory=list, description="clean values kept for drift statistics")


class SignalCalibration(_Strict):
    """One flag signal's clean distribution: a sorted sample and an exponential upper tail.

    The tail (peaks over ``tail_start``, the clean quantile 1 - ``tail_share``, with mean excess
    ``tail_scale``) extends the tail probability beyond the largest clean value, so a score above
    every calibration clip still grows with how far out it is (``models.defense.flag``)."""

    sample: list[float] = Field(min_length=2, description="sorted clean values (evenly thinned)")
    tail_start: float
    tail_scale: float = Field(gt=0)
    tail_share: float = Field(default=0.1, gt=0, lt=1)
    p99: float | None = Field(default=None, description="the clean 99th percentile, for readers")


class FlagCalibration(_Strict):
    """The suspected-attack flag (issue 24): several cheap signals, each mapped to its clean tail
    probability; ``attack_score`` = -log10 of the smallest (an attacker must keep every signal
    clean-looking at once), flagged above ``thresholds[set]``, the clean (1 - fpr) quantile of the
    score over that signal set (``input``: before any purification; ``defended``: with the
    purification's own signals). ``auto_threshold``: ``defend=auto`` purifies clips whose input
    score is above it. Bundles without this section keep the MC-loss threshold flag."""

    version: int = 1
    n: int = Field(ge=1)
    source: str = ""
    fpr: float = Field(default=0.01, gt=0, lt=1)
    noise_epsilon: float = Field(default=4 / 255, ge=0, le=1)
    signals: dict[str, SignalCalibration]
    thresholds: dict[str, float]
    auto_threshold: float | None = None
    auto_quantile: float | None = None
    score_sample: list[float] = Field(
        default_factory=list, description="clean input scores over the threshold (the drift reference)"
    )
    command: str | None = None


class BundleMeta(_Strict):
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    labels: list[str] = Field(min_length=2)
    input: InputSpec
    flow: FlowSpec
    classifier: ClassifierSpec
    flow_normalisation: FlowNormalisation = Field(default_factory=FlowNormalisation)
    defense: DefenseSpec = Field(default_factory=DefenseSpec)
    calibration: Calibration | None = None
    flag: FlagCalibration | None = Field(default=None, description="the multi-signal attack flag (issue 24)")
    sha256: dict[str, str] = Field(default_factory=dict)
    training: dict = Field(default_factory=dict, description="how the weights were made (free form)")

    @model_validator(mode="after")
    def _labels_match_classes(self) -> BundleMeta:
        if len(self.labels) != self.classifier.num_classes:
            raise ValueError(f"{len(self.labels)} labels but the classifier has {self.classifier.num_classes} classes")
        return self

    @model_validator(mode="after")
    def _defense_refers_to_calibration(self) -> BundleMeta:
        stop = self.defense.stop_quantile
        if stop is not None and (self.calibration is None or stop not in self.calibration.quantiles):
            known = sorted(self.calibration.quantiles) if self.calibration else []
            raise ValueError(f"defense.stop_quantile {stop!r} is not a calibration quantile (known: {known})")
        return self

    def auto_threshold(self, override: float | None = None) -> float | None:
        """The MC loss above which ``defend=auto`` purifies: ``override`` (settings), else the
        defence section's, else the calibration's threshold; None when the bundle has none
        (``models.defense_mode.resolve_policy`` decides it)."""
        return resolve_policy(self, threshold=override).mc_threshold

    def stop_below(self) -> float | None:
        """The early-stop target of the purification (``defense.stop_quantile`` of the calibration)."""
        stop = self.defense.stop_quantile
        return self.calibration.quantiles[stop] if stop is not None and self.calibration is not None else None


def read_bundle_meta(bundle_dir: str | Path) -> BundleMeta:
    """Parse and validate ``bundle.json`` (no weights are read or checked here)."""
    path = Path(bundle_dir) / BUNDLE_FILE
    if not path.is_file():
        raise BundleError(f"no {BUNDLE_FILE} in {Path(bundle_dir)}: not a model bundle")
    try:
        return BundleMeta.model_validate(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from exc
    except ValidationError as exc:
        raise BundleError(f"{path}: invalid bundle metadata: {exc}") from exc


def write_bundle_meta(bundle_dir: str | Path, meta: BundleMeta) -> Path:
    path = Path(bundle_dir) / BUNDLE_FILE
    path.write_text(json.dumps(meta.model_dump(mode="json"), indent=2) + "\n")
    return path
