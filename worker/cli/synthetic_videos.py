"""A folder of labelled MotionShapes videos (``DIR/<label>/<n>.mp4``): input for ``motionguard
finetune`` and ``motionguard eval --videos`` when no real labelled videos are at hand.

Clips come from the test split's seeds (the demo bundle never trained on them), are H.264-encoded
like uploads usually are, and are therefore decoded with compression artefacts, as real videos are.
Run ``python -m worker.cli.synthetic_videos DIR --per-class 20`` to write one.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write_motionshapes_videos(
    folder: Path,
    *,
    per_class: int,
    classes: dict[str, str] | None = None,
    frames: int = 16,
    size: int = 64,
    first_index: int = 0,
) -> dict[str, list[Path]]:
    """Write ``per_class`` videos per class; ``classes`` maps folder label -> MotionShapes class
    (default: all ten, under their own names). Item i of class c is test-split seed
    ``first_index + i * len(CLASSES) + c``, so folders written with other ``first_index`` ranges
    share no clip."""
    from models.data.synthetic import CLASSES, make_clip, split_seed
    from worker.video import encode_mp4, to_uint8

    classes = classes or {name: name for name in CLASSES}
    written: dict[str, list[Path]] = {}
    for label, source in classes.items():
        cls = CLASSES.index(source)
        (folder / label).mkdir(parents=True, exist_ok=True)
        written[label] = []
        for i in range(per_class):
            seed = split_seed("test", first_index + i * len(CLASSES) + cls)
            clip, _ = make_clip(seed, cls, frames=frames, size=size)
            path = folder / label / f"{i:03d}.mp4"
            encode_mp4(to_uint8(clip.numpy()), path)
            written[label].append(path)
    log.info("wrote %d videos of %d classes to %s", per_class * len(classes), len(classes), folder)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--first-index", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    write_motionshapes_videos(
        args.folder, per_class=args.per_class, frames=args.frames, size=args.size, first_index=args.first_index
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
