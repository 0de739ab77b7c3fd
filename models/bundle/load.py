"""Model bundles: ``bundle.json`` + weight files, checked by sha256 before anything is loaded.

A bundle is the unit the service deploys: the flow model, the classifier, the labels, the input
geometry, the defence defaults and the clean MC-loss calibration travel together, so a worker can
never pair a classifier with a flow model (or a threshold) it was not made with.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from models.bundle_meta import (
    DEFAULT_BUNDLE_DIR,
    BundleMeta,
    ClassifierSpec,
    DefenseSpec,
    FlowSpec,
    InputSpec,
    read_bundle_meta,
    write_bundle_meta,
)
from models.defense.pipeline import Pipeline
from models.defense.purify import DefenseConfig
from models.defense_mode import DefensePolicy, resolve_policy
from models.errors import BundleError
from models.nets.checkpoints import load_i3d_weights, load_raft_weights, read_state_dict
from models.nets.flow import VideoRAFT, build_video_raft
from models.nets.i3d import build_i3d

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_BUNDLE_DIR", "LoadedBundle", "create_bundle", "load_bundle", "make_random_bundle", "sha256_of"]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class LoadedBundle:
    path: Path
    meta: BundleMeta
    pipeline: Pipeline
    policy: DefensePolicy  # how this bundle answers defend= in this process (resolved once, at load)

    @property
    def labels(self) -> list[str]:
        return self.meta.labels


#: Named defence variants (overrides of the bundle's ``defense`` section) that the evaluation and
#: ``motionguard bench defence`` compare; ``paper`` is Algorithm 1 as published.
_PAPER: dict[str, object] = {
    "keep_best": False,
    "schedule": "constant",
    "stop_quantile": None,
    "random_start": 0.0,
    "restarts": 1,
}
_CONVERGE: dict[str, object] = {**_PAPER, "keep_best": True, "schedule": "plateau", "stop_quantile": "p50"}
DEFENSE_VARIANTS: dict[str, dict[str, object]] = {
    "paper": _PAPER,
    "best": {**_PAPER, "keep_best": True},
    "best-plateau": {**_PAPER, "keep_best": True, "schedule": "plateau"},
    "best-cosine": {**_PAPER, "keep_best": True, "schedule": "cosine"},
    "converge": _CONVERGE,
    "converge-random3": {**_CONVERGE, "random_start": 4 / 255, "restarts": 3},
}


def parse_variant(text: str) -> dict[str, object]:
    """A variant name of ``DEFENSE_VARIANTS``, or ``field=value,...`` over the ``defense`` section
    (``keep_best=true,schedule=cosine``); values are parsed as JSON where they can be."""
    import json

    text = text.strip()
    if text in DEFENSE_VARIANTS:
        return dict(DEFENSE_VARIANTS[text])
    if "=" not in text:
        raise BundleError(f"unknown defence variant {text!r} (known: {', '.join(DEFENSE_VARIANTS)}, or field=value)")
    out: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value.strip()
    return out


def with_defense(meta: BundleMeta, overrides: dict[str, object]) -> BundleMeta:
    """The bundle's metadata with ``defense`` fields replaced (validated like bundle.json)."""
    from pydantic import ValidationError

    try:
        return BundleMeta.model_validate({**meta.model_dump(), "defense": {**meta.defense.model_dump(), **overrides}})
    except ValidationError as exc:
        raise BundleError(f"invalid defence settings {overrides}: {exc.errors()[0]['msg']}") from None


#: ``DefenseConfig`` fields the bundle resolves from other sections, not copied from ``defense``.
RESOLVED_DEFENSE_FIELDS = ("flow_updates", "stop_below")


def defense_config(meta: BundleMeta) -> DefenseConfig:
    """The purification a bundle's ``defense`` section describes: every ``DefenseConfig`` field the
    section names is taken from it by name (a field added to both is carried without a copy here),
    the gradient flow's updates from ``flow`` and the early-stop target resolved against the calibration."""
    shared = {f.name for f in dataclasses.fields(DefenseConfig)} - set(RESOLVED_DEFENSE_FIELDS)
    return DefenseConfig(
        **{name: getattr(meta.defense, name) for name in sorted(shared)},
        flow_updates=meta.flow.updates_grad,
        stop_below=meta.stop_below(),
    )


def _verify_hashes(bundle_dir: Path, meta: BundleMeta) -> None:
    for name in (meta.flow.checkpoint, meta.classifier.checkpoint):
        path = bundle_dir / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"bundle file names must be relative to the bundle: {name!r}")
        if not path.is_file():
            raise BundleError(f"bundle {bundle_dir}: weight file {name} is missing")
        expected = meta.sha256.get(name)
        if expected is None:
            raise BundleError(f"bundle {bundle_dir}: no sha256 recorded for {name}")
        actual = sha256_of(path)
        if actual != expected:
            raise BundleError(
                f"bundle {bundle_dir}: {name} does not match its sha256 (expected {expected[:12]}…, got {actual[:12]}…)"
            )


def build_models(meta: BundleMeta) -> tuple[VideoRAFT, torch.nn.Module]:
    """Randomly initialised models of the bundle's architecture."""
    flow = build_video_raft(meta.flow.arch, corr_levels=meta.flow.corr_levels, corr_radius=meta.flow.corr_radius)
    classifier = build_i3d(
        meta.classifier.num_classes, width=meta.classifier.width, temporal_pool=meta.classifier.temporal_pool
    )
    return flow, classifier


def load_bundle(
    bundle_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    mode: str | None = None,
    threshold: float | None = None,
) -> LoadedBundle:
    """Verify and load a bundle onto ``device`` ("cpu" or "cuda[:n]").

    With no ``bundle_dir`` it loads the tools' default, MotionShapes v1.1 (``DEFAULT_BUNDLE_DIR``:
    what eval, calibrate, finetune and the benches measure), not the service's default model
    (``models.bundle_meta.SERVED_BUNDLE_DIR``): the service and ``motionguard classify`` always pass
    ``settings.bundle_dir``, so a bare call here never decides what the service serves.

    ``mode`` and ``threshold`` override the ``defense`` section's default mode and ``defend=auto``
    threshold (the deployment's settings); None keeps the bundle's."""
    bundle_dir = Path(bundle_dir) if bundle_dir else DEFAULT_BUNDLE_DIR
    meta = read_bundle_meta(bundle_dir)
    if mode is not None or threshold is not None:
        meta = with_defense(meta, {k: v for k, v in {"mode": mode, "threshold": threshold}.items() if v is not None})
    _verify_hashes(bundle_dir, meta)
    flow, classifier = build_models(meta)
    load_raft_weights(flow.raft, read_state_dict(bundle_dir / meta.flow.checkpoint), meta.flow.format)
    load_i3d_weights(classifier, read_state_dict(bundle_dir / meta.classifier.checkpoint))
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BundleError("device 'cuda' requested but CUDA is not available on this machine")
    policy = resolve_policy(meta, mode=mode, threshold=threshold)
    pipeline = Pipeline(
        flow,
        classifier,
        defense=defense_config(meta),
        flow_norm=meta.flow_normalisation,
        updates_infer=meta.flow.updates_infer,
        threshold=policy.mc_threshold,
        default_mode=policy.default_mode,
    ).to(device)
    if policy.decided_on == "attack_score":
        # defend=auto decides on the attack flag's score (issue 24); a deployment's explicit MC-loss
        # threshold (``threshold``) keeps the MC-loss decision.
        from models.defense.flag import FlagDecision

        pipeline.decide_auto = FlagDecision(pipeline, meta.flag, threshold=policy.flag_threshold)
    log.info("loaded bundle %s v%s from %s on %s", meta.name, meta.version, bundle_dir, device)
    return LoadedBundle(path=bundle_dir, meta=meta, pipeline=pipeline, policy=policy)


def create_bundle(
    out_dir: str | Path, meta: BundleMeta, raft_checkpoint: str | Path, i3d_checkpoint: str | Path
) -> Path:
    """Copy the weights into ``out_dir``, record their sha256, write bundle.json, and prove it loads.

    The checkpoint names in ``meta`` are replaced by the copies' names. Raises ``BundleError`` if the
    weights don't fit the declared architectures (nothing is left behind in that case).
    """
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"flow.pth": Path(raft_checkpoint), "classifier.pth": Path(i3d_checkpoint)}
    try:
        for name, source in files.items():
            if not source.is_file():
                raise BundleError(f"checkpoint not found: {source}")
            if source.resolve() != (out_dir / name).resolve():
                shutil.copyfile(source, out_dir / name)
        meta = meta.model_copy(
            update={
                "flow": meta.flow.model_copy(update={"checkpoint": "flow.pth"}),
                "classifier": meta.classifier.model_copy(update={"checkpoint": "classifier.pth"}),
                "sha256": {name: sha256_of(out_dir / name) for name in files},
            }
        )
        write_bundle_meta(out_dir, meta)
        load_bundle(out_dir)
    except BundleError:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return out_dir


def make_random_bundle(
    out_dir: str | Path,
    *,
    frames: int = 4,
    size: int = 64,
    num_classes: int = 3,
    i3d_width: float = 0.125,
    seed: int = 0,
    steps: int = 2,
) -> Path:
    """A tiny randomly initialised bundle for tests and benchmarks (labels class0, class1, ...)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    meta = BundleMeta(
        name="random-test",
        version="0",
        labels=[f"class{i}" for i in range(num_classes)],
        input=InputSpec(frames=frames, height=size, width=size),
        flow=FlowSpec(arch="raft_small", checkpoint="flow.pth", corr_levels=3 if size < 128 else None),
        classifier=ClassifierSpec(checkpoint="classifier.pth", width=i3d_width, num_classes=num_classes),
        defense=DefenseSpec(steps=steps),
        training={"note": "random weights, for tests only"},
    )
    flow, classifier = build_models(meta)
    raft_path, i3d_path = out_dir / "flow.pth", out_dir / "classifier.pth"
    torch.save(flow.raft.state_dict(), raft_path)
    torch.save(classifier.state_dict(), i3d_path)
    return create_bundle(out_dir, meta, raft_path, i3d_path)
