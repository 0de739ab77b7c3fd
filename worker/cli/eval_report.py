"""``motionguard eval report A.json [B.json ...]``: merge eval runs, print the tables, write the README section.

Row groups and clip shards of one evaluation run in separate processes (each its own JSON and state
file); this merges their per-clip records (refusing files of another evaluation or records that
disagree), recomputes every summary with ``models.robustness.report`` and, with ``--readme``, replaces
the README's ``## Robustness`` section with the generated text, so the published numbers are the
records' and nothing is typed by hand (``--notes FILE`` adds a measured commentary paragraph).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "merge eval JSONs, print the tables, regenerate the README's Robustness section"
SECTION = "## Robustness"
SIDECARS = (".cost.json", ".state.json")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reports", type=Path, nargs="+", help="eval JSONs of one evaluation (motionguard eval --json)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the merged tables here")
    parser.add_argument("--json", dest="merged_json", type=Path, default=None, help="write the merged summary here")
    parser.add_argument("--readme", type=Path, default=None, help="replace this file's '## Robustness' section")
    parser.add_argument("--notes", type=Path, default=None, help="Markdown paragraph(s) appended to the section")
    parser.add_argument("--first", type=int, default=None, help="also tabulate the first N clips (comparisons)")


def _headline(summary: dict) -> str:
    rows = {r["name"]: r for r in summary["rows"]}
    worst = next((w for w in summary["worst_case"] if w["epsilon_255"] == 8), None)
    if worst is None:
        return "No eps = 8/255 attack rows in these reports."
    from models.robustness.report import fmt_accuracy as _fmt

    text = (
        f"**Worst case over the {len(worst['rows']) - ('clean' in worst['rows'])} attacks at eps 8/255 (clean clip"
        f" and every attack must leave it correct): defended {_fmt(worst['defended'])} % on {worst['n']} clips;"
        f" correct or flagged {_fmt(worst['correct_or_flagged'])} %.**"
    )
    transfer = rows.get("pgd:8")
    if transfer:
        text += (
            f" Beside it, the transfer figure (PGD-8 on the undefended model, then the defence):"
            f" {_fmt(transfer['defended'])} % on {transfer['n']} clips."
        )
    detector = [r for r in summary["rows"] if ":detector=" in r["name"]]
    if detector:
        strongest = min(detector, key=lambda r: r["correct_or_flagged"]["value"])
        text += (
            f" Strongest detector-aware attack ({strongest['name']}): correct or flagged"
            f" {_fmt(strongest['correct_or_flagged'])} % on {strongest['n']} clips."
        )
    return text


METHOD = """\
How the rows are made (`models/robustness/attacks.py`, `models/robustness/through.py`, `models/robustness/spec.py`;
budgets in 1/255, clips in [0, 1], L-inf; attack gradients through RAFT use 2 updates, every
accuracy the real 12-update prediction):

- Transfer (the attack sees only the undefended model): `pgd` (20 steps of eps/4, uniform random
  start), `apgd-ce` (10 steps, AutoAttack's random start, momentum and step halving). The real
  defended prediction judges the iterate every `check` steps (default 10 for PGD, 5 for APGD: a
  check is one defended prediction, ~16x an undefended one) and the last one; the first that fools
  it is kept.
- `bpda` (Athalye et al.): 20 steps, cosine step decay from 5 eps/steps, uniform random start; the
  purification runs forward for real and is the identity backward. Every iterate x_0..x_20 is
  judged by the real defended prediction (it is computed anyway) and the first that fools it kept.
- `through`: the same loop, but the gradient replays the last `unroll` (default 4) purification
  steps differentiably (second order through RAFT, the warp and the MC loss; sign exact forward,
  tanh(g / (tau mean|g|)) backward), identity before them, with the step sizes the defence
  recorded; 10 steps by default.
- `detector=lambda` (on bpda / through): starts at the clip itself (uniform noise of eps alone gets
  most clips flagged) and adds -lambda L_MC(x_adv) (2-update flow) to the objective while the clip's
  real MC loss (inference flow) is above 0.9 x threshold. An iterate only counts as a success if its
  defended prediction is wrong AND its MC loss is at or under the bundle's threshold (not flagged):
  a wrong but flagged answer reaches the operator as suspected, so for these rows "correct or
  flagged" is one minus the attack's success rate.
- Columns: `undefended` = the undefended model on the row's clip; `defended` = the real defended
  prediction; `flagged` = MC loss before any defence (inference flow) over the bundle's calibration
  threshold (clean p99); `correct or flagged` = the system's outcome is not a silent error; AUROC =
  the row's clips against the clean ones by the MC loss before defence.
- `worst-case:eps`: on the clips every row of that budget ran on, robust only if the clean clip and
  every attack of the budget leave it defended-correct (AutoAttack-style); correct-or-flagged alike.
  Clips run clip-major (every row on clip i before clip i+1), so a run stopped early leaves every
  row on the same first clips.
- Intervals: 95 % percentile bootstrap over clips (2000 resamples, seed 0). Every clip runs alone
  with a seed derived from (seed, row, clip), deterministic kernels on, so one command gives the same
  JSON twice on one machine (`tests/test_evaluate.py` checks it); another machine may differ in the
  last bits, which the purification amplifies per clip."""


def section_text(
    header: dict, headers: list[dict], summary: dict, costs: dict, first: dict | None, notes: str, report_command: str
) -> str:
    from models.robustness.report import rows_table, threshold_text

    machine = header["machine"]
    commands = "\n".join(f"    OMP_NUM_THREADS=1 {h['command']}" for h in headers)
    parts = [
        SECTION,
        "",
        "<!-- generated by `motionguard eval report` (command below): regenerate, do not edit by hand -->",
        "",
        f"Bundle {header['bundle']['name']} v{header['bundle']['version']}, defence as in the bundle "
        f"({header['signature']['defense']['steps']} steps), clips from {header['source']}, seed "
        f"{header['signature']['seed']}, MC-loss threshold {threshold_text(header['threshold'])}.",
        "",
        _headline(summary),
        "",
        *rows_table(summary, costs),
        "",
    ]
    if first is not None:
        parts += [f"The same rows on the first {first['n']} clips (comparable with earlier checks on those clips):", ""]
        parts += [*rows_table(first["summary"]), ""]
    parts += [
        METHOD,
        "",
        f"Measured on {machine['cpu']} ({machine['torch_threads']} torch thread(s) per process, torch"
        f" {machine['torch']}); `s/clip` is wall time per clip with other jobs sharing the 2 cores. Commands"
        " (each writes its JSON, `.md`, `.cost.json` and state file; all resume; the report merges them):",
        "",
        commands,
        "",
        "    " + report_command,
        "",
    ]
    if summary.get("sanity"):
        parts += ["Sanity checks (clips every row ran on): `" + json.dumps(summary["sanity"]) + "`", ""]
    if notes:
        parts += [notes.strip(), ""]
    return "\n".join(parts)


def replace_section(text: str, body: str) -> str:
    """``text`` with its ``## Robustness`` section (up to the next ``## `` heading) replaced by ``body``."""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        return text.rstrip("\n") + "\n\n" + body
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]) + body.rstrip("\n") + "\n\n" + "".join(lines[end:])


def run(args: argparse.Namespace) -> int:
    from models.errors import UserError
    from models.robustness.report import load_costs, load_reports, rows_table, summarise, to_markdown

    for path in args.reports:
        if not path.is_file():
            raise UserError(f"{path}: no such file")
    # A glob such as docs/eval/*.json also names each run's sidecars: they are read beside their report.
    args.reports = [p for p in args.reports if not p.name.endswith(SIDECARS)]
    if not args.reports:
        raise UserError("no eval report among the files (only .cost.json / .state.json sidecars)")
    header, clips, headers = load_reports(args.reports)
    summary = summarise(clips, header["threshold"])
    costs = load_costs(args.reports)
    markdown = to_markdown(header, summary, costs)
    first = None
    # The comparison table only when some clip lies beyond the first N (else it repeats the main table).
    if args.first and any(i >= args.first for recs in clips.values() for i in recs):
        first_summary = summarise(clips, header["threshold"], first=args.first)
        first = {"n": args.first, "summary": first_summary}
        markdown += f"\nFirst {args.first} clips:\n\n" + "\n".join(rows_table(first_summary)) + "\n"
    if args.markdown:
        args.markdown.write_text(markdown)
    if args.merged_json:
        args.merged_json.write_text(json.dumps({"sources": [h["path"] for h in headers], **summary}, indent=1) + "\n")
    if args.readme:
        notes = args.notes.read_text() if args.notes else ""
        body = section_text(header, headers, summary, costs, first, notes, "motionguard " + " ".join(sys.argv[1:]))
        args.readme.write_text(replace_section(args.readme.read_text(), body))
    print(markdown)
    return 0
