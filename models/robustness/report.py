"""Summaries of evaluation records: per-row accuracies with bootstrap intervals, the worst case, the report.

One code path summarises a single ``motionguard eval`` run and several merged ones
(``motionguard eval report a.json b.json``: row groups or clip shards run in separate processes),
so the published numbers (docs/robustness.md) are exactly what the per-clip records say.

Definitions (also written into docs/robustness.md):

- ``defended``: the real defended prediction of the clip the attack returned is correct.
- ``flagged``: the clip's MC loss before any defence (inference flow) is over the bundle's
  calibration threshold: the service reports it as suspected.
- ``correct or flagged``: the system's outcome is not a silent error.
- ``worst case`` (per budget eps, AutoAttack-style): on the clips every row of that budget ran on,
  a clip is robust only if its clean clip is defended correctly and every attack of that budget
  failed on it; correct-or-flagged likewise per attack.
- 95 % intervals: percentile bootstrap over clips (2000 resamples, fixed seed: reproducible).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from models.errors import UserError
from models.robustness.spec import parse_attack

SCHEMA = "motionguard-eval/2"
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0


def auroc(negatives: Sequence[float], positives: Sequence[float]) -> float:
    """P(positive score > negative score), ties counting half (the Mann-Whitney statistic)."""
    if not negatives or not positives:
        return float("nan")
    neg = torch.tensor(list(negatives), dtype=torch.float64)
    pos = torch.tensor(list(positives), dtype=torch.float64)
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def percent(flags: Sequence[bool]) -> float | None:
    return round(100.0 * sum(flags) / len(flags), 1) if flags else None


def bootstrap_ci(flags: Sequence[bool], level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval (in %) of the share of True over clips; seeded, so reproducible."""
    if not flags:
        return None
    values = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    generator = torch.Generator().manual_seed(BOOTSTRAP_SEED)
    draws = torch.randint(len(values), (BOOTSTRAP_RESAMPLES, len(values)), generator=generator)
    means = values[draws].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64))
    return [round(100 * float(low), 1), round(100 * float(high), 1)]


def _quantiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    t = torch.tensor(list(values), dtype=torch.float64)
    return {f"p{int(q * 100)}": round(float(t.quantile(q)), 5) for q in (0.05, 0.5, 0.95)}


def epsilon_of(row: str) -> float | None:
    """The attack budget (1/255) of an attack row; None for the clean and the uniform-noise rows."""
    if row in ("clean", "random"):
        return None
    return parse_attack(row).epsilon_255


def _accuracy(flags: list[bool]) -> dict:
    return {"value": percent(flags), "ci95": bootstrap_ci(flags)}


def is_flagged(record: dict, threshold: float | None) -> bool:
    """The multi-signal flag where the record carries it (issue 24), else the MC loss over the threshold."""
    if record.get("flagged") is not None:
        return bool(record["flagged"])
    return threshold is not None and record["mc_before"] > threshold


def summarise_row(name: str, records: dict[int, dict], threshold: float | None, clean_mc: list[float]) -> dict:
    recs = [records[i] for i in sorted(records)]
    flagged = [is_flagged(r, threshold) for r in recs]
    steps = [r["fooled_at"] for r in recs if r.get("fooled_at") is not None]
    checked = [r["agrees"] for r in recs if r.get("agrees") is not None]
    summary = {
        "name": name,
        "n": len(recs),
        "standard": _accuracy([r["standard"] for r in recs]),
        "random": _accuracy([r["random"] for r in recs]),
        "defended": _accuracy([r["defended"] for r in recs]),
        "flagged": percent(flagged),
        "correct_or_flagged": _accuracy([r["defended"] or f for r, f in zip(recs, flagged, strict=True)]),
        "auroc": None if name == "clean" or not clean_mc else round(auroc(clean_mc, [r["mc_before"] for r in recs]), 4),
        "mc_before": _quantiles([r["mc_before"] for r in recs]),
        "mc_after": _quantiles([r["mc_after"] for r in recs]),
        "first_success_step_median": float(torch.tensor(steps, dtype=torch.float64).median()) if steps else None,
        "check_agreement": percent(checked),
    }
    return summary


def worst_case(clips: dict[str, dict[int, dict]], threshold: float | None) -> list[dict]:
    """Per budget: robust only if the clean clip and every attack of that budget leave it correct."""
    by_eps: dict[float, list[str]] = {}
    for row in clips:
        eps = epsilon_of(row)
        if eps is not None and not row.startswith("random"):
            by_eps.setdefault(eps, []).append(row)
    out = []
    for eps, rows in sorted(by_eps.items()):
        members = (["clean"] if "clean" in clips else []) + rows
        common = sorted(set.intersection(*(set(clips[r]) for r in members)))
        if not common:
            continue

        def safe(r: dict) -> bool:
            return r["defended"] or is_flagged(r, threshold)

        robust = [all(clips[r][i]["defended"] for r in members) for i in common]
        system = [all(safe(clips[r][i]) for r in members) for i in common]
        out.append(
            {
                "name": f"worst-case:{eps:g}",
                "epsilon_255": eps,
                "n": len(common),
                "rows": members,
                "defended": _accuracy(robust),
                "correct_or_flagged": _accuracy(system),
            }
        )
    return out


def sanity_checks(clips: dict[str, dict[int, dict]]) -> dict:
    """On the clips every row ran on: a huge budget must break the undefended model, and more PGD steps
    at one budget must never raise undefended accuracy."""
    if not clips:
        return {}
    common = sorted(set.intersection(*(set(r) for r in clips.values())))
    standard = {name: percent([clips[name][i]["standard"] for i in common]) for name in clips}
    checks: dict[str, object] = {"n": len(common)}
    large = [n for n in clips if n.startswith("pgd:") and float(n.split(":")[1]) >= 64]
    if large:
        checks["large_budget_undefended_accuracy"] = standard[large[0]]
    by_eps: dict[str, list[tuple[int, float]]] = {}
    for name in clips:
        if not name.startswith("pgd:"):
            continue
        spec = parse_attack(name)
        if set(spec.options) <= {"steps", "n", "check"} and standard[name] is not None:
            by_eps.setdefault(f"{spec.epsilon_255:g}", []).append((spec.steps, standard[name]))
    for eps, points in by_eps.items():
        if len(points) > 1:
            points.sort()
            accs = [a for _, a in points]
            checks[f"pgd:{eps} accuracy by steps"] = dict(points)
            checks[f"pgd:{eps} monotone"] = all(b <= a + 1e-9 for a, b in zip(accs, accs[1:], strict=False))
    return checks


def summarise(clips: dict[str, dict[int, dict]], threshold: float | None, first: int | None = None) -> dict:
    """Rows, worst case and sanity checks of a set of per-clip records (``first``: only clips < first)."""
    if first is not None:
        clips = {row: {i: r for i, r in recs.items() if i < first} for row, recs in clips.items()}
        clips = {row: recs for row, recs in clips.items() if recs}
    clean_mc = [r["mc_before"] for r in clips.get("clean", {}).values()]
    return {
        "rows": [summarise_row(name, recs, threshold, clean_mc) for name, recs in clips.items()],
        "worst_case": worst_case(clips, threshold),
        "sanity": sanity_checks(clips),
    }


# ---- files: one run's JSON, merging several, Markdown ----


def clips_to_json(clips: dict[str, dict[int, dict]]) -> dict:
    return {row: {str(i): recs[i] for i in sorted(recs)} for row, recs in clips.items()}


SOURCE_KEY = "source_bundle"  # the bundle transfer rows were crafted on: in the signature of runs with them


def _evaluation(signature: dict) -> dict:
    """What must match to merge two runs: the signature less the transfer rows' source bundle (rows
    that do not use it are the same evaluation with or without it; the rows that do are checked
    against each other)."""
    return {k: v for k, v in signature.items() if k != SOURCE_KEY}


def _crafted_on_source(row: str) -> bool:
    return row != "clean" and parse_attack(row).needs_source


def load_reports(paths: Sequence[Path]) -> tuple[dict, dict[str, dict[int, dict]], list[dict]]:
    """Merge per-clip records of several eval JSONs of one evaluation (same signature); returns
    (the first report's header, with the source bundle of the transfer rows if any report has one;
    merged clips; every report's header) or raises UserError."""
    headers, merged, sources = [], {}, {}
    for path in paths:
        try:
            report = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable eval JSON ({exc})") from exc
        if report.get("schema") != SCHEMA:
            raise UserError(f"{path}: not a {SCHEMA} report (rerun it with this version's motionguard eval)")
        if headers and _evaluation(report["signature"]) != _evaluation(headers[0]["signature"]):
            raise UserError(f"{path}: another evaluation (bundle, defence, seed or source differ from {paths[0]})")
        report["path"] = str(path)
        headers.append(report)
        for row, recs in report["clips"].items():
            if _crafted_on_source(row):
                source = report.get(SOURCE_KEY)
                if sources.setdefault(row, source) != source:
                    raise UserError(f"{path}: row {row} was crafted on another source bundle than in an earlier file")
            target = merged.setdefault(row, {})
            for key, rec in recs.items():
                if int(key) in target and target[int(key)] != rec:
                    raise UserError(f"{path}: row {row} clip {key} differs from an earlier file's record")
                target[int(key)] = rec
    if not headers:
        raise UserError("no eval JSON given")
    header = headers[0]
    used = next((source for source in sources.values() if source), None)
    if used is not None:
        header = {**header, SOURCE_KEY: used}
    return header, merged, headers


def load_costs(paths: Sequence[Path]) -> dict[str, float]:
    """Mean seconds per clip per row from the ``.cost.json`` files beside the reports (where present)."""
    totals: dict[str, list[float]] = {}
    for path in paths:
        cost = Path(path).with_suffix(".cost.json")
        if cost.is_file():
            for row, item in json.loads(cost.read_text()).get("rows", {}).items():
                pair = totals.setdefault(row, [0.0, 0.0])
                pair[0] += item["seconds"]
                pair[1] += item["clips"]
    return {row: round(s / c, 1) for row, (s, c) in totals.items() if c}


def threshold_text(threshold: float | None) -> str:
    return "none (bundle not calibrated: nothing is flagged)" if threshold is None else f"{threshold:.5f}"


def fmt_accuracy(acc: dict | None) -> str:
    if not acc or acc.get("value") is None:
        return "–"
    low, high = acc["ci95"]
    return f"{acc['value']:.1f} [{low:.1f}, {high:.1f}]"


def rows_table(summary: dict, costs: dict[str, float] | None = None) -> list[str]:
    costs = costs or {}
    lines = [
        "| row | n | undefended | defended [95 % CI] | flagged | correct or flagged [95 % CI] | AUROC | s/clip |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary["rows"]:
        au = f"{r['auroc']:.3f}" if isinstance(r["auroc"], float) and not math.isnan(r["auroc"]) else "–"
        flagged = "–" if r["flagged"] is None else f"{r['flagged']:.1f}"
        cost = costs.get(r["name"])
        lines.append(
            f"| {r['name']} | {r['n']} | {fmt_accuracy(r['standard'])} | {fmt_accuracy(r['defended'])} | {flagged} | "
            f"{fmt_accuracy(r['correct_or_flagged'])} | {au} | {'–' if cost is None else cost} |"
        )
    for w in summary["worst_case"]:
        lines.append(
            f"| **{w['name']}** ({len(w['rows'])} rows) | {w['n']} | – | **{fmt_accuracy(w['defended'])}** | – | "
            f"**{fmt_accuracy(w['correct_or_flagged'])}** | – | – |"
        )
    return lines


def source_text(header: dict) -> str:
    """The sentence naming the bundle the transfer rows were crafted on ("" without transfer rows)."""
    source = header.get(SOURCE_KEY)
    if not source:
        return ""
    hashes = ", ".join(f"{name} {digest[:12]}" for name, digest in sorted(source["sha256"].items()))
    return f" Transfer rows crafted on {source['name']} v{source['version']} (its undefended model; sha256 {hashes})."


def to_markdown(header: dict, summary: dict, costs: dict[str, float] | None = None) -> str:
    """One run's (or one merge's) table with its settings."""
    sig = header["signature"]
    lines = [
        f"Bundle {header['bundle']['name']} v{header['bundle']['version']}, {header['source']}, seed {sig['seed']},"
        f" MC-loss threshold {threshold_text(header['threshold'])}; accuracies in % with 95 % bootstrap intervals."
        + source_text(header)
        + (
            f" Flagged = the multi-signal attack flag (score thresholds {sig['flag']}; docs/flag.md), not the MC loss;"
            " a flag-aware row's success is a wrong AND unflagged answer."
            if sig.get("flag")
            else ""
        ),
        "",
        *rows_table(summary, costs),
    ]
    if summary.get("sanity"):
        lines += ["", "Sanity checks (clips every row ran on): " + json.dumps(summary["sanity"])]
    return "\n".join(lines) + "\n"
