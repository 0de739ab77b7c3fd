"""Fine-tuning a bundle's classifier on a user's labelled videos (``motionguard finetune``'s core).

The bundle's RAFT is kept as it is (its flow is what the classifier will see in deployment), so its
flows are computed once per video and cached on disk; the I3D is initialised from the bundle's with
a new logits layer for the new labels. By default only that head trains, on features of the frozen
backbone computed once (seconds per epoch even on a CPU); ``full=True`` trains the whole I3D on the
cached flows. Videos, not clips, are split into train / validation / test, per class, so clips of
one video never sit on both sides. The epoch loop (checkpoints, resume, best epoch, early stopping
on validation accuracy) is ``models.training.classifier_fit``'s. The result is a new bundle: the source's
flow weights, the new classifier, the new labels, and a calibration measured on the clean
validation clips, with the command and the whole run recorded in ``bundle.json``.

Decoding is the caller's job (``worker.cli.finetune`` decodes and cuts exactly as the service does);
this module only sees clips, so it stays free of video and queue code.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from models.bundle.load import create_bundle, load_bundle, sha256_of
from models.bundle_meta import BundleMeta, read_bundle_meta, write_bundle_meta
from models.defense.calibrate import store_calibration, summarise
from models.errors import UserError
from models.nets.i3d import InceptionI3d, build_i3d, flow_to_classifier_input
from models.training.classifier_fit import FitConfig, accuracy, fit_classifier
from models.training.common import training_device
from models.training.flow_cache import load_or_compute

log = logging.getLogger(__name__)

STATE = "finetune_state.pt"
BEST = "finetune_best.pt"
RUN = "finetune_run.json"
SPLITS = ("train", "val", "test")


@dataclass
class LabelledVideo:
    """One decoded video: its clips (K, T, 3, H, W) in [0, 1] at the bundle's geometry."""

    name: str  # path relative to the folder, for reports
    key: str  # content hash of the file: names its cached flows
    label: int
    clips: Tensor


@dataclass
class FinetuneConfig:
    run_dir: Path
    out: Path
    name: str
    version: str = "1"
    full: bool = False  # train the whole I3D, not only the new head
    epochs: int = 40
    patience: int = 8
    max_minutes: float = 20.0
    lr: float | None = None  # default: 1e-2 for the head, 1e-3 for the whole I3D
    batch_size: int = 32
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    flow_batch: int = 8
    device: str = "cpu"
    command: str = ""
    calibration_quantile: float = 0.99
    extra: dict = field(default_factory=dict)  # recorded in bundle.json as given (e.g. the folder)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-3 if self.full else 1e-2)


def split_by_video(labels: list[int], names: list[str], val_fraction: float, test_fraction: float, seed: int):
    """Indices of the videos of each split, drawn per class (``labels[i]`` indexes ``names``; every
    class in every split that has any videos); the same labels and seed always give the same split."""
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise UserError("need 0 < val fraction < 1, 0 <= test fraction, and val + test < 1")
    g = torch.Generator().manual_seed(seed)
    splits: dict[str, list[int]] = {name: [] for name in SPLITS}
    for cls, name in enumerate(names):
        members = [i for i, label in enumerate(labels) if label == cls]
        members = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
        n_val = max(1, round(len(members) * val_fraction))
        n_test = round(len(members) * test_fraction) if test_fraction else 0
        if len(members) - n_val - n_test < 1:
            raise UserError(
                f"class '{name}' has {len(members)} video(s): too few for a training video, "
                f"{n_val} validation and {n_test} test video(s) (videos, not clips, are split)"
            )
        splits["val"] += members[:n_val]
        splits["test"] += members[n_val : n_val + n_test]
        splits["train"] += members[n_val + n_test :]
    return {name: sorted(ids) for name, ids in splits.items()}


def _cached_inference(bundle, videos: list[LabelledVideo], run_dir: Path, batch: int) -> list[dict[str, Tensor]]:
    """Per video: the forward flows (float16) and clean MC loss of its clips, from the bundle's own
    undefended prediction path (``Pipeline.predict``: what a worker computes for them). One cache
    file per video, named by the video's content, the flow weights, the RAFT updates, the defence's
    MC-loss settings and the clip geometry."""
    meta = bundle.meta
    flow_sha = meta.sha256[meta.flow.checkpoint][:12]
    updates = meta.flow.updates_infer
    geometry = f"{meta.input.frames}x{meta.input.height}x{meta.input.width}{meta.input.resize[0]}"
    d = meta.defense
    mc = f"{d.similarity}{d.lambda_smooth:g}-{d.edge_lambda:g}{'m' if d.multi else ''}"
    folder = run_dir / "flows"
    out = []
    for video in tqdm(videos, desc="flows", mininterval=10, dynamic_ncols=True):
        path = folder / f"{video.key[:24]}_{flow_sha}_{updates}u_{mc}_{geometry}_{len(video.clips)}c.pt"

        def compute(video: LabelledVideo = video) -> dict[str, Tensor]:
            flows, losses = [], []
            for b in range(0, len(video.clips), batch):
                pred = bundle.pipeline.predict(video.clips[b : b + batch], defend=False, keep_flows=True)
                flows.append(pred.flows_before.half().cpu())
                losses.append(pred.mc_before.cpu())
            return {"flows": torch.cat(flows), "mc_loss": torch.cat(losses)}

        out.append(load_or_compute(path, compute))
    return out


def _classifier(bundle, num_classes: int, seed: int) -> InceptionI3d:
    """The bundle's I3D with a new, seeded logits layer for ``num_classes`` labels."""
    meta = bundle.meta
    model = build_i3d(
        meta.classifier.num_classes, width=meta.classifier.width, temporal_pool=meta.classifier.temporal_pool
    )
    source = bundle.pipeline.classifier
    model.load_state_dict(source.state_dict())
    torch.manual_seed(seed)
    model.replace_logits(num_classes)
    torch.nn.init.normal_(model.logits.conv3d.weight, std=0.01)
    torch.nn.init.zeros_(model.logits.conv3d.bias)
    return model


def _stack(items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in items]), torch.cat([torch.full((len(x),), y) for x, y in items])


def _check_run_dir(run_dir: Path, record: dict) -> None:
    """A run directory resumes only the run it was made for: same videos, split, bundle and mode."""
    path = run_dir / RUN
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(k for k in record if previous.get(k) != record[k])
        if changed:
            raise UserError(
                f"{run_dir} holds a fine-tuning run with different {', '.join(changed)}: "
                "use another --run-dir (or delete this one) to start over"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")


@torch.no_grad()
def _held_out_accuracy(classify, cached: list[dict[str, Tensor]], videos: list[LabelledVideo], ids: list[int]) -> dict:
    """Top-1 of the new classifier on held-out videos' flows (the bundle's RAFT, cached): per clip,
    and per video (the mean of its clips' probabilities, as the service reports a video)."""
    correct_clips = clips = correct_videos = 0
    for i in ids:
        probs = classify(cached[i]["flows"].float()).softmax(1).cpu()
        correct_clips += int((probs.argmax(1) == videos[i].label).sum())
        clips += len(probs)
        correct_videos += int(int(probs.mean(0).argmax()) == videos[i].label)
    return {
        "videos": len(ids),
        "clips": clips,
        "clip_accuracy": round(correct_clips / max(1, clips), 4),
        "video_accuracy": round(correct_videos / max(1, len(ids)), 4),
    }


def finetune(bundle_dir: Path | None, labels: list[str], videos: list[LabelledVideo], cfg: FinetuneConfig) -> dict:
    """Fine-tune and write the new bundle to ``cfg.out``; returns the report stored in its bundle.json."""
    if len(labels) < 2:
        raise UserError(f"fine-tuning needs at least 2 classes, got {len(labels)}")
    t_start = time.perf_counter()
    device = training_device(cfg.device)
    bundle = load_bundle(bundle_dir, device)
    meta = bundle.meta
    run_dir = Path(cfg.run_dir)
    splits = split_by_video([v.label for v in videos], labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    record = {
        "labels": labels,
        "videos": {name: [videos[i].key for i in ids] for name, ids in splits.items()},
        "bundle_weights": dict(meta.sha256),
        "full": cfg.full,
        "seed": cfg.seed,
    }
    _check_run_dir(run_dir, record)

    t_flows = time.perf_counter()
    cached = _cached_inference(bundle, videos, run_dir, cfg.flow_batch)
    flows = [item["flows"] for item in cached]
    flow_minutes = (time.perf_counter() - t_flows) / 60
    model = _classifier(bundle, len(labels), cfg.seed).to(device)
    norm = meta.flow_normalisation

    def inputs_of(split: str) -> tuple[Tensor, Tensor]:
        items = [(flows[i], videos[i].label) for i in splits[split]]
        x, y = _stack(items)
        if cfg.full:
            return x, y
        # Frozen backbone: its features are a fixed function of the flow, computed once.
        model.eval()
        with torch.no_grad():
            feats = [
                model.features(flow_to_classifier_input(x[b : b + 64].to(device).float(), norm)).cpu()
                for b in range(0, len(x), 64)
            ]
        return torch.cat(feats), y

    train_x, train_y = inputs_of("train")
    val_sets = {"val_acc": inputs_of("val")}
    if cfg.full:
        forward = lambda f: model(flow_to_classifier_input(f, norm))  # noqa: E731
        parameters, train_mode = list(model.parameters()), model.train
    else:
        forward = model.head

        def train_mode() -> None:  # batch norm of the frozen backbone stays in eval mode
            model.eval()
            model.dropout.train()

        parameters = list(model.logits.parameters())
    fit = FitConfig(
        epochs=cfg.epochs,
        max_minutes=cfg.max_minutes,
        lr=cfg.learning_rate,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        warmup=0.05,
        patience=cfg.patience,
        checkpoint_every=20,
        desc="finetune",
    )
    state = fit_classifier(
        model,
        forward,
        train_x,
        train_y,
        val_sets,
        fit,
        ckpt_path=run_dir / STATE,
        best_path=run_dir / BEST,
        parameters=parameters,
        train_mode=train_mode,
    )
    best = torch.load(run_dir / BEST, map_location="cpu", weights_only=True)
    model.load_state_dict(best)
    train_acc = accuracy(forward, model, train_x, train_y)

    new_meta = BundleMeta(
        name=cfg.name,
        version=cfg.version,
        labels=labels,
        input=meta.input,
        flow=meta.flow,
        classifier=meta.classifier.model_copy(update={"num_classes": len(labels)}),
        flow_normalisation=meta.flow_normalisation,
        defense=meta.defense,
        training={},
    )
    out = create_bundle(cfg.out, new_meta, bundle.path / meta.flow.checkpoint, run_dir / BEST)
    # The clean MC loss of the validation clips was measured by the (unchanged) RAFT path while
    # caching: the calibration needs no second pass. The written bundle's own pipeline classifies.
    val_losses = [float(v) for i in splits["val"] for v in cached[i]["mc_loss"]]
    calibration = summarise(val_losses, cfg.calibration_quantile)
    store_calibration(out, calibration)
    pipeline = load_bundle(out, device).pipeline

    def classify(x: Tensor) -> Tensor:
        return pipeline.classify_flows(x.to(device))

    held_out = {name: _held_out_accuracy(classify, cached, videos, splits[name]) for name in ("val", "test")}
    report = {
        "command": cfg.command,
        "source_bundle": {"path": str(bundle.path), "name": meta.name, "version": meta.version, "sha256": meta.sha256},
        "trained": "whole I3D" if cfg.full else "logits layer (frozen I3D backbone)",
        "videos": {name: len(ids) for name, ids in splits.items()},
        "clips": {name: sum(len(videos[i].clips) for i in ids) for name, ids in splits.items()},
        "epochs": state["epoch"],
        "best_epoch": state["best_epoch"],
        "stopped_early": bool(state.get("stopped_early")),
        "train_clip_accuracy": round(train_acc, 4),
        "val_clip_accuracy": round(state["best"].get("val_acc", 0.0), 4),
        "calibration": {"n": calibration.n, "threshold": calibration.threshold, "source": "clean validation clips"},
        "val": held_out["val"],
        "flow_minutes": round(flow_minutes, 2),
        "train_minutes": round(state["elapsed"] / 60, 2),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items() if k != "command"},
        "history": state["history"],
    }
    if splits["test"]:
        report["test"] = held_out["test"]
    report["minutes"] = round((time.perf_counter() - t_start) / 60, 2)
    current = read_bundle_meta(out)
    write_bundle_meta(out, current.model_copy(update={"training": {"finetune": report}}))
    log.info("fine-tuned bundle written to %s (weights %s)", out, sha256_of(out / "classifier.pth")[:12])
    return report
