"""The robustness evaluation behind ``motionguard eval`` (the paper's Tables 1-4 and Fig. 5).

For every row (clean inputs, uniformly noised inputs, each attack) three accuracies, in percent:
``standard`` (the undefended model on the row's inputs), ``random`` (the row's inputs plus uniform
noise within the defence's bound eps_r, no purification: is any perturbation enough?) and
``defended`` (purified, then classified). Static attacks target the undefended model; the
defence-aware ones (adaptive I/II, BPDA) target the defence and run on a fixed subset of the clips.
Every accuracy uses the full 12 RAFT updates. The MC loss before defence of clean and attacked
clips gives the detection AUROC.

Work is done per batch and recorded per clip in a state file, so an interrupted evaluation resumes
where it stopped (the sample, attacks and settings must match).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from models.attacks import AttackSpec, run_attack
from models.defense import project
from models.pipeline import Pipeline

log = logging.getLogger(__name__)

ClipSource = Callable[[int], tuple[Tensor, int]]  # index -> (clip (T,3,H,W) in [0,1], label)


@dataclass
class ClipRecord:
    standard: bool
    random: bool
    defended: bool
    mc_before: float
    mc_after: float


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """P(positive score > negative score), ties counting half (the Mann-Whitney statistic)."""
    if not negatives or not positives:
        return float("nan")
    neg = torch.tensor(list(negatives), dtype=torch.float64)
    pos = torch.tensor(list(positives), dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


@torch.no_grad()
def _score(pipeline: Pipeline, x: Tensor, y: Tensor, noise_eps: float) -> list[ClipRecord]:
    plain = pipeline.predict(x, defend=False)
    noised = project(x + (torch.rand_like(x) * 2 - 1) * noise_eps, x, noise_eps)
    random_pred = pipeline.predict(noised, defend=False).probs.argmax(1)
    defended = pipeline.predict(x, defend=True)
    std_pred, def_pred = plain.probs.argmax(1), defended.probs.argmax(1)
    return [
        ClipRecord(
            standard=bool(std_pred[i] == y[i]),
            random=bool(random_pred[i] == y[i]),
            defended=bool(def_pred[i] == y[i]),
            mc_before=float(plain.mc_before[i]),
            mc_after=float(defended.mc_after[i]),
        )
        for i in range(len(y))
    ]


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

    def records(self, row: str, subset: Sequence[int] | None = None) -> list[ClipRecord]:
        saved = self.rows.get(row, {})
        keys = sorted(saved, key=int) if subset is None else [str(i) for i in subset if str(i) in saved]
        return [ClipRecord(**saved[k]) for k in keys]


def evaluate(
    pipeline: Pipeline,
    source: ClipSource,
    indices: Sequence[int],
    attacks: Sequence[AttackSpec],
    *,
    adaptive_n: int = 50,
    batch_size: int = 8,
    noise_eps_255: float = 8.0,
    random_n: int | None = None,
    state_path: Path | None = None,
    seed: int = 0,
    identity: dict | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Run every row on its clips and return the report dict (see ``motionguard eval``)."""
    rows: list[tuple[str, AttackSpec | None, list[int]]] = [("clean", None, list(indices))]
    rows.append(("random", AttackSpec("random", noise_eps_255), list(indices)[: random_n or len(indices)]))
    for spec in attacks:
        count = int(spec.options.get("n", adaptive_n if spec.defense_aware else len(indices)))
        rows.append((spec.name, spec, list(indices)[:count]))
    defense = pipeline.defense
    # Records are kept per row name and clip index, so a later run with a larger n (or more rows)
    # reuses every clip already done; only what decides a clip's outcome is in the signature.
    signature = {"defense": asdict(defense), "seed": seed, **(identity or {})}
    state = EvaluationState(state_path, signature)
    timings: dict[str, float] = {}
    for name, spec, subset in rows:
        todo = [i for i in subset if not state.done(name, i)]
        started = time.perf_counter()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            clips, labels = zip(*(source(i) for i in chunk), strict=True)
            x = torch.stack(clips).to(pipeline.device)
            y = torch.tensor(labels, device=pipeline.device)
            torch.manual_seed(seed + chunk[0])  # random starts reproducible per clip batch
            if spec is not None:
                x = run_attack(spec, pipeline, x, y)
            for i, record in zip(chunk, _score(pipeline, x, y, defense.epsilon), strict=True):
                state.add(name, i, record)
            state.save()
            if progress is not None:
                progress(name, len(subset) - len(todo) + start + len(chunk), len(subset))
        timings[name] = round(time.perf_counter() - started, 1)
    return build_report(state, rows, timings, defense.epsilon)


def _percent(flags: Sequence[bool]) -> float:
    return round(100.0 * sum(flags) / len(flags), 1) if flags else float("nan")


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    t = torch.tensor(list(values), dtype=torch.float64)
    return {f"p{int(q * 100)}": round(float(t.quantile(q)), 5) for q in (0.05, 0.5, 0.95)}


def build_report(state: EvaluationState, rows, timings: dict[str, float], defense_eps: float) -> dict:
    clean = state.records("clean", rows[0][2])
    report_rows, auroc_by_attack, mc = [], {}, {}
    for name, spec, subset in rows:
        records = state.records(name, subset)
        report_rows.append(
            {
                "name": name,
                "n": len(records),
                "standard": _percent([r.standard for r in records]),
                "random": _percent([r.random for r in records]),
                "defended": _percent([r.defended for r in records]),
                "seconds": timings.get(name),
            }
        )
        mc[name] = {
            "before": _quantiles([r.mc_before for r in records]),
            "after": _quantiles([r.mc_after for r in records]),
        }
        if spec is not None:
            auroc_by_attack[name] = round(auroc([r.mc_before for r in clean], [r.mc_before for r in records]), 4)
    return {
        "n": len(clean),
        "defense_epsilon_255": round(defense_eps * 255, 2),
        "rows": report_rows,
        "auroc": auroc_by_attack,
        "mc_loss": mc,
        **_sanity_on_common_clips(state, rows),
    }


def _sanity_on_common_clips(state: EvaluationState, rows) -> dict:
    """Sanity checks on the clips every row ran on: rows of different n (e.g. pgd:8 on 200 clips,
    pgd:8:steps=40 on 50) are only comparable on the same clips."""
    common = sorted(set.intersection(*(set(subset) for _, _, subset in rows)))
    restricted = [
        {"name": name, "standard": _percent([r.standard for r in state.records(name, common)])} for name, _, _ in rows
    ]
    return {"sanity": sanity_checks(restricted), "sanity_n": len(common)}


def sanity_checks(rows: list[dict]) -> dict:
    """Checks an honest evaluation should pass, computed from whatever rows were run."""
    by_name = {r["name"]: r for r in rows}
    checks: dict[str, object] = {}
    large = [r for n, r in by_name.items() if n.startswith("pgd:") and float(n.split(":")[1]) >= 64]
    if large:
        checks["large_budget_undefended_accuracy"] = large[0]["standard"]
    # more steps never help the defender: standard accuracy must not rise with steps at a fixed eps
    by_eps: dict[str, list[tuple[int, float]]] = {}
    for name, r in by_name.items():
        parts = name.split(":")
        if parts[0] != "pgd":
            continue
        steps = next((int(float(p.split("=")[1])) for p in parts[2:] if p.startswith("steps=")), 20)
        if all(p.startswith(("steps=", "n=")) for p in parts[2:]):
            by_eps.setdefault(parts[1], []).append((steps, r["standard"]))
    for eps, points in by_eps.items():
        if len(points) > 1:
            points.sort()
            accs = [a for _, a in points]
            checks[f"pgd:{eps} accuracy by steps"] = dict(points)
            checks[f"pgd:{eps} monotone"] = all(b <= a + 1e-9 for a, b in zip(accs, accs[1:], strict=False))
    return checks


def to_markdown(report: dict) -> str:
    lines = [
        f"n = {report['n']} clips (defence-aware attacks on a subset: see n per row); accuracies in %;"
        f" defence eps_r = {report['defense_epsilon_255']}/255",
        "",
        "| row | n | standard | random | defended | AUROC (MC loss) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        au = report["auroc"].get(r["name"])
        au_text = f"{au:.3f}" if isinstance(au, float) else "–"
        lines.append(f"| {r['name']} | {r['n']} | {r['standard']} | {r['random']} | {r['defended']} | {au_text} |")
    if report.get("sanity"):
        common = f"on the {report.get('sanity_n')} clips every row ran on"
        lines += ["", f"Sanity checks ({common}): " + json.dumps(report["sanity"])]
    return "\n".join(lines) + "\n"


def plot_mc_distributions(state_rows: dict[str, list[ClipRecord]], attack: str, out_png: Path) -> None:
    """Fig. 5: MC loss of clean, attacked and defended (purified attacked) clips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clean = [r.mc_before for r in state_rows["clean"]]
    attacked = [r.mc_before for r in state_rows[attack]]
    defended = [r.mc_after for r in state_rows[attack]]
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
    fig.savefig(out_png)
    plt.close(fig)
