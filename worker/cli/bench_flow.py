"""``motionguard bench flow``: video RAFT against torchvision's pairwise call, measured side by side.

``naive_s`` runs torchvision's ``RAFT.forward`` on every pair (both encoders on both frames of
every pair, once per direction); ``efficient_s`` runs ``VideoRAFT`` (feature encoder once per
frame, context encoder once per source frame). ``limit`` is the speedup there would be if the
saved encoder work cost nothing and the rest were unchanged: the encoders are timed alone in the
same run, and limit = naive_s / (naive_s - saved_s). In grad mode (what the defence repeats K times:
2 updates, forward + backward to the pixels) the encoders are a large share; in infer mode
(12 updates, no grad) the update loop dominates, so the limit is close to 1.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", choices=["raft_small", "raft_large"], default="raft_small")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=128, help="H = W of the clip")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--mode", choices=["grad", "infer"], default="grad")
    parser.add_argument("--multi", action="store_true", help="forward + backward + long-range flows (Eq. 10)")
    parser.add_argument("--corr-levels", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")


def _timed_pair(
    first: Callable[[], object], second: Callable[[], object], repeats: int, sync: Callable[[], None]
) -> tuple[float, float]:
    """Best-of-``repeats`` times of two functions, run alternately so that a change in the machine's
    load during the run affects both sides alike (the ratio is what gets reported)."""
    first(), second()  # warm-up: allocator, kernels
    sync()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def run_flow_benchmark(
    arch: str = "raft_small",
    frames: int = 16,
    size: int = 128,
    batch: int = 1,
    mode: str = "grad",
    multi: bool = False,
    corr_levels: int | None = None,
    repeats: int = 5,
    device: str = "cpu",
) -> dict:
    import torch

    from models.nets.flow import build_video_raft, pair_indices, pairwise_flows

    if mode not in ("grad", "infer"):
        raise ValueError("mode must be grad or infer")
    torch.manual_seed(0)
    dev = torch.device(device)
    model = build_video_raft(arch, corr_levels=corr_levels).eval().to(dev).requires_grad_(False)
    raft = model.raft
    if size < model.min_size or size % 8:
        raise ValueError(
            f"size {size}: torchvision's pairwise baseline needs a multiple of 8 >= {model.min_size}"
            " (fewer --corr-levels lower the minimum)"
        )
    clip = torch.rand(batch, frames, 3, size, size, device=dev)
    directions = ("forward", "backward", "long") if multi else ("forward",)
    updates = 2 if mode == "grad" else 12
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def run(fn: Callable[[torch.Tensor], list[torch.Tensor]]) -> Callable[[], list[torch.Tensor]]:
        def step() -> list[torch.Tensor]:
            if mode == "infer":
                with torch.no_grad():
                    return fn(clip)
            x = clip.clone().requires_grad_(True)
            flows = fn(x)
            sum(f.abs().mean() for f in flows).backward()
            return flows

        return step

    naive = run(lambda x: [pairwise_flows(raft, x, updates, d) for d in directions])
    efficient = run(lambda x: list(model(x, updates, directions).values()))
    naive_s, efficient_s = _timed_pair(naive, efficient, repeats, sync)
    with torch.no_grad():
        max_abs_diff = max(
            (a - b).abs().max().item()
            for a, b in zip(
                [pairwise_flows(raft, clip, updates, d) for d in directions],
                model(clip, updates, directions).values(),
                strict=True,
            )
        )

    # Encoder work each implementation does, timed alone the way each one calls it: the naive path
    # runs both encoders once per direction (feature on both frames of every pair, context on the
    # sources); ours runs the feature encoder on the T frames and the context encoder on the
    # distinct source frames, once.
    pairs = [pair_indices(frames, d) for d in directions]
    source_frames = len({s for src, _ in pairs for s in src})

    def encoder_step(calls: list[tuple[torch.nn.Module, int]]) -> Callable[[], None]:
        inputs = [(encoder, torch.rand(batch * count, 3, size, size, device=dev) * 2 - 1) for encoder, count in calls]

        def step() -> None:
            for encoder, images in inputs:
                if mode == "infer":
                    with torch.no_grad():
                        encoder(images)
                else:
                    x = images.clone().requires_grad_(True)
                    encoder(x).sum().backward()

        return step

    naive_calls = [(raft.feature_encoder, 2 * len(src)) for src, _ in pairs]
    naive_calls += [(raft.context_encoder, len(src)) for src, _ in pairs]
    ours_calls = [(raft.feature_encoder, frames), (raft.context_encoder, source_frames)]
    naive_enc, ours_enc = _timed_pair(encoder_step(naive_calls), encoder_step(ours_calls), repeats, sync)
    saved_s = naive_enc - ours_enc
    return {
        "arch": arch,
        "frames": frames,
        "size": size,
        "batch": batch,
        "mode": mode,
        "multi": multi,
        "flow_updates": updates,
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "naive_s": round(naive_s, 4),
        "efficient_s": round(efficient_s, 4),
        "speedup": round(naive_s / efficient_s, 3),
        "encoder_saved_s": round(saved_s, 4),
        "limit": round(naive_s / max(naive_s - saved_s, 1e-9), 3),
        "max_abs_diff": max_abs_diff,
    }


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError

    if args.frames < 2 or args.size < 16 or args.repeats < 1 or args.batch < 1:
        raise UserError("need --frames >= 2, --size >= 16, --repeats >= 1, --batch >= 1")
    try:
        result = run_flow_benchmark(
            args.arch,
            args.frames,
            args.size,
            args.batch,
            args.mode,
            args.multi,
            args.corr_levels,
            args.repeats,
            args.device,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    if not args.json:
        print(
            f"{result['arch']} {result['frames']}x{result['size']}x{result['size']} {result['mode']}"
            f"{' multi' if result['multi'] else ''}: naive {result['naive_s']:.3f}s, efficient "
            f"{result['efficient_s']:.3f}s, speedup {result['speedup']:.2f}x (limit {result['limit']:.2f}x), "
            f"max |diff| {result['max_abs_diff']:.2e} px"
        )
    print(json.dumps(result))
    return 0
