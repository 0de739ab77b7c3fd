"""The robustness evaluation behind ``motionguard eval``: runs rows of (attack, clips) and records each clip.

Per clip and row: ``standard`` (the undefended model on the row's input), ``random`` (that input
plus uniform noise of the defence's bound, undefended), ``defended`` (the real
``predict(defend=True)``, 12 RAFT updates), the MC loss before (inference flow: what the detector
thresholds) and after the defence, and ``fooled_at``, the attack step whose iterate was kept (first
success) when the attack looks for one. Summaries (bootstrap intervals, worst case, flagged share)
are ``models.robustness.report``'s job, so the same code summarises one run and several merged ones.

Honest numbers need reproducible ones. Every clip is attacked and scored on its own (batch 1 by
default: the purification amplifies last-bit differences, and batched convolutions differ in the
last bit from single ones, so a clip's outcome would otherwise depend on its batch neighbours) with
its own seed derived from (seed, row, clip). A clip's result thus depends only on the clip, the row,
the seed, the bundle and the machine, whatever the shard, batch order or resume point. Records go to
a state file after each batch; a rerun resumes, and ``shard=(i, n)`` lets n processes split the clips.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from models.defense.pipeline import Pipeline
from models.defense.purify import project
from models.robustness.spec import AttackSpec, run_attack

log = logging.getLogger(__name__)

ClipSource = Callable[[int], tuple[Tensor, int]]  # index -> (clip (T,3,H,W) in [0,1], label)
HARNESS_VERSION = 2  # part of the state signature: records of an older harness are not reused


@dataclass
class ClipRecord:
    standard: bool
    random: bool
    defended: bool
    mc_before: float
    mc_after: float
    fooled_at: int | None = None  # attack step of the kept iterate (its own check accepted it); None: not found
    agrees: bool | None = None  # the attack's own check agrees with ``defended`` (None: not checked)
    seconds: float = 0.0  # attack + scoring time (state file only: timings are not part of the report)
    flagged: bool | None = None  # the multi-signal flag (issue 24) was raised; None: scored without one
    attack_score: float | None = None  # its combined score over the threshold (> 1: flagged)
    signals: dict[str, float] | None = None  # the flag's per-signal values


RECORD_ONLY = ("seconds", "signals")  # kept in the state file, not compared across runs


RESULT_FIELDS = tuple(f.name for f in fields(ClipRecord) if f.name not in RECORD_ONLY)


@dataclass(frozen=True)
class Row:
    name: str
    spec: AttackSpec | None  # None: the clean row
    indices: list[int]


def clip_seed(seed: int, row: str, index: int) -> int:
    """The torch seed of one clip of one row: independent of batches, shards and resume points."""
    return (seed * 1_000_003 + zlib.crc32(row.encode()) * 7_919 + index) % (2**63)


def machine_info() -> dict:
    """What the numbers were measured on (the same command on another machine may differ in the last bits,
    which the chaotic purification amplifies)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def _success(
    spec: AttackSpec, defended: bool, mc_before: float, threshold: float | None, flagged: bool | None = None
) -> bool:
    """The attack's goal, judged on the final record (detector-aware: wrong AND not flagged; flag-aware:
    wrong AND not flagged by the multi-signal flag)."""
    if spec.flag_aware:
        return not defended and flagged is False
    if spec.detector_aware:
        return not defended and threshold is not None and mc_before <= threshold
    return not defended


@torch.no_grad()
def _score(
    pipeline: Pipeline, x: Tensor, y: Tensor, noise_eps: float, defend: bool | str, flag=None
) -> list[ClipRecord]:
    plain = pipeline.predict(x, defend=False, keep_flows=flag is not None)
    noised = project(x + (torch.rand_like(x) * 2 - 1) * noise_eps, x, noise_eps)
    random_pred = pipeline.predict(noised, defend=False).probs.argmax(1)
    defended = pipeline.predict(x, defend=defend)
    std_pred, def_pred = plain.probs.argmax(1), defended.probs.argmax(1)
    records = [
        ClipRecord(
            standard=bool(std_pred[i] == y[i]),
            random=bool(random_pred[i] == y[i]),
            defended=bool(def_pred[i] == y[i]),
            mc_before=float(plain.mc_before[i]),
            mc_after=float(defended.mc_after[i]),
        )
        for i in range(len(y))
    ]
    if flag is not None:
        from models.defense.flag import read_flag_of

        reading = read_flag_of(pipeline, x, plain, flag, defended=defended)
        for i, record in enumerate(records):
            signals, score, flagged = reading.of(i)
            record.flagged, record.attack_score = flagged, None if score is None else round(score, 5)
            record.signals = {k: round(v, 6) for k, v in signals.items()}
    return records


class EvaluationState:
    """Per-row, per-clip records on disk: the resume point of a long evaluation."""

    def __init__(self, path: Path | None, signature: dict):
        self.path = path
        self.signature = signature
        self.rows: dict[str, dict[str, dict]] = {}
        if path is not None and path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("signature") == signature:
                self.rows = saved["rows"]
                done = sum(len(r) for r in self.rows.values())
                log.info("resuming evaluation from %s (%d clip results already done)", path, done)
            else:
                log.warning("state file %s belongs to another evaluation; starting afresh", path)

    def done(self, row: str, index: int) -> bool:
        return str(index) in self.rows.get(row, {})

    def add(self, row: str, index: int, record: ClipRecord) -> None:
        self.rows.setdefault(row, {})[str(index)] = asdict(record)

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"signature": self.signature, "rows": self.rows}))
        tmp.replace(self.path)

    def records(self, row: str, subset: Sequence[int] | None = None) -> dict[int, ClipRecord]:
        saved = self.rows.get(row, {})
        keys = sorted(saved, key=int) if subset is None else [str(i) for i in subset if str(i) in saved]
        return {int(k): ClipRecord(**saved[k]) for k in keys}


def plan_rows(
    indices: Sequence[int],
    attacks: Sequence[AttackSpec],
    *,
    clean_n: int | None = None,
    random_n: int | None = None,
    adaptive_n: int = 50,
    noise_eps_255: float = 8.0,
    shard: tuple[int, int] = (0, 1),
) -> list[Row]:
    """Each row's clips: the first n of ``indices`` (rows share clips), then this shard's share of them
    (index mod shard count). ``clean_n``/``random_n`` 0 leave that row out (run it in another process)."""
    part, parts = shard
    everything = list(indices)

    def first(count: int) -> list[int]:
        return [i for i in everything[:count] if i % parts == part]

    rows: list[Row] = []
    if clean_n is None or clean_n > 0:
        rows.append(Row("clean", None, first(clean_n or len(everything))))
    if random_n is None or random_n > 0:
        spec = AttackSpec("random", noise_eps_255)
        rows.append(Row("random", spec, first(random_n or len(everything))))
    for spec in attacks:
        count = int(spec.options.get("n", adaptive_n if spec.defense_aware else len(everything)))
        rows.append(Row(spec.name, spec, first(count)))
    return rows


def evaluate(
    pipeline: Pipeline,
    source: ClipSource,
    rows: Sequence[Row],
    *,
    threshold: float | None,
    batch_size: int = 1,
    state_path: Path | None = None,
    seed: int = 0,
    identity: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    on_checkpoint: Callable[[EvaluationState], None] | None = None,
    defend: bool | str = True,
    flag=None,
    source_pipeline: Pipeline | None = None,
) -> EvaluationState:
    """Run every row on its clips (resuming from ``state_path``); returns the state with all records.

    ``on_checkpoint(state)`` runs after each batch of clips (all rows): partial reports of a long run.
    ``flag``: the bundle's flag calibration; with it every record also carries the multi-signal flag
    (and the flag-aware attacks can run). Without it the signature, and so the resume, is as before.
    ``source_pipeline``: the other bundle ``transfer`` rows are crafted on (the caller puts its
    identity into ``identity``, so a resume with another source starts afresh)."""
    defense = pipeline.defense
    # Records are kept per row name and clip index, so a later run with a larger n (or more rows)
    # reuses every clip already done; only what decides a clip's outcome is in the signature.
    signature = {
        "harness": HARNESS_VERSION,
        "defense": asdict(defense),
        "seed": seed,
        "threshold": threshold,
        "batch": batch_size,
        "defend": defend,
        **({"flag": flag.thresholds} if flag is not None else {}),
        **(identity or {}),
    }
    state = EvaluationState(state_path, signature)
    # Clip-major order: every row advances on the same clips, so a run stopped early (or still going)
    # has a common prefix of clips on which all rows, and so the worst case, are comparable.
    order = sorted(
        {i for row in rows for i in row.indices}, key=lambda i: min(r.indices.index(i) for r in rows if i in r.indices)
    )
    members = {row.name: set(row.indices) for row in rows}
    todo = [[i for i in order if i in members[row.name] and not state.done(row.name, i)] for row in rows]
    position = {row.name: len(row.indices) - len(left) for row, left in zip(rows, todo, strict=True)}
    for start in range(0, len(order), batch_size):
        group = set(order[start : start + batch_size])
        for row, left in zip(rows, todo, strict=True):
            chunk = [i for i in left if i in group]
            if not chunk:
                continue
            _run_chunk(pipeline, source, row, chunk, state, threshold, seed, defend, flag, source_pipeline)
            position[row.name] += len(chunk)
            if progress is not None:
                progress(row.name, position[row.name], len(row.indices))
        if on_checkpoint is not None:
            on_checkpoint(state)
    return state


def _run_chunk(
    pipeline: Pipeline,
    source: ClipSource,
    row: Row,
    chunk: list[int],
    state: EvaluationState,
    threshold: float | None,
    seed: int,
    defend: bool | str,
    flag=None,
    source_pipeline: Pipeline | None = None,
) -> None:
    started = time.perf_counter()
    clips, labels = zip(*(source(i) for i in chunk), strict=True)
    x = torch.stack(clips).to(pipeline.device)
    y = torch.tensor(labels, device=pipeline.device)
    torch.manual_seed(clip_seed(seed, row.name, chunk[0]))
    fooled_at = None
    if row.spec is not None:
        result = run_attack(row.spec, pipeline, x, y, threshold, defend, flag=flag, source=source_pipeline)
        x, fooled_at = result.x, result.fooled_at
    records = _score(pipeline, x, y, pipeline.defense.epsilon, defend, flag)
    seconds = round((time.perf_counter() - started) / len(chunk), 2)
    for b, (i, record) in enumerate(zip(chunk, records, strict=True)):
        record.seconds = seconds
        if fooled_at is not None:
            _attach_check(row.spec, record, int(fooled_at[b]), threshold)
        state.add(row.name, i, record)
    state.save()


def _attach_check(spec: AttackSpec, record: ClipRecord, at: int, threshold: float | None) -> None:
    """Record where the attack found its success and whether the real prediction agrees with its check
    (attacks that judge every iterate: a clip they never accepted must not be a success)."""
    success = _success(spec, record.defended, record.mc_before, threshold, record.flagged)
    if at >= 0:
        record.fooled_at, record.agrees = at, success
    elif spec.judges_every_iterate:
        record.agrees = not success
    if at < 0 and success:
        record.fooled_at = spec.steps  # found by the last iterate, which the scoring judged


def plot_mc_distributions(
    clean: list[float], attacked: list[float], defended: list[float], attack: str, out_png: Path
) -> None:
    """Fig. 5: MC loss of clean, attacked and defended (purified attacked) clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from models.robustness.report import auroc

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    everything = clean + attacked + defended
    bins = torch.linspace(min(everything), max(everything), 40).tolist()
    ax.hist(clean, bins=bins, alpha=0.6, color="0.5", label="clean")
    ax.hist(attacked, bins=bins, alpha=0.6, color="tab:red", label=f"attacked ({attack})")
    ax.hist(defended, bins=bins, alpha=0.6, color="tab:green", label="defended")
    ax.set_xlabel("motion-consistency loss (before defence; defended: after)")
    ax.set_ylabel("clips")
    ax.set_title(f"AUROC clean vs attacked: {auroc(clean, attacked):.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, metadata={"Software": None})
    plt.close(fig)
