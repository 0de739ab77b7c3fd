"""The evaluation harness: rows, AUROC, resume, report formats (tiny random model)."""

from __future__ import annotations

import json

import pytest
import torch

from models.attacks import parse_attack
from models.bundle import load_bundle
from models.evaluate import auroc, evaluate, plot_mc_distributions, sanity_checks, to_markdown


def test_auroc_known_values():
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([0.1, 0.2], [0.1, 0.2]) == 0.5


def test_sanity_checks_detect_non_monotone_steps():
    rows = [
        {"name": "pgd:8:steps=10", "standard": 30.0},
        {"name": "pgd:8", "standard": 40.0},
        {"name": "pgd:64", "standard": 0.0},
    ]
    checks = sanity_checks(rows)
    assert checks["pgd:8 monotone"] is False
    assert checks["large_budget_undefended_accuracy"] == 0.0


def test_evaluate_rows_resume_and_outputs(random_bundle, tmp_path):
    pipeline = load_bundle(random_bundle).pipeline
    generator = torch.Generator().manual_seed(0)
    clips = [torch.rand(4, 3, 64, 64, generator=generator) for _ in range(4)]
    calls: list[int] = []

    def source(i: int):
        calls.append(i)
        return clips[i], i % 3

    attacks = [parse_attack("pgd:8:steps=2"), parse_attack("bpda:8:steps=1"), parse_attack("pgd:4:steps=1:n=1")]
    state = tmp_path / "state.json"
    report = evaluate(pipeline, source, range(4), attacks, adaptive_n=2, batch_size=2, state_path=state)
    assert [r["name"] for r in report["rows"]] == [
        "clean",
        "random",
        "pgd:8:steps=2",
        "bpda:8:steps=1",
        "pgd:4:n=1:steps=1",
    ]
    assert [r["n"] for r in report["rows"]] == [4, 4, 4, 2, 1]
    for row in report["rows"]:
        for column in ("standard", "random", "defended"):
            assert 0.0 <= row[column] <= 100.0
    assert set(report["auroc"]) == {"random", "pgd:8:steps=2", "bpda:8:steps=1", "pgd:4:n=1:steps=1"}
    assert report["n"] == 4
    # a second run with the same settings does no clip work at all
    calls.clear()
    again = evaluate(pipeline, source, range(4), attacks, adaptive_n=2, batch_size=2, state_path=state)
    assert calls == [] and again["rows"] == [
        dict(r, seconds=again["rows"][i]["seconds"]) for i, r in enumerate(report["rows"])
    ]
    markdown = to_markdown(report)
    assert "| pgd:8:steps=2 | 4 |" in markdown
    json.dumps(report)

    from models.evaluate import EvaluationState

    saved = EvaluationState(state, json.loads(state.read_text())["signature"])
    png = tmp_path / "mc.png"
    plot_mc_distributions(
        {"clean": saved.records("clean"), "pgd:8:steps=2": saved.records("pgd:8:steps=2")}, "pgd:8:steps=2", png
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_attack_is_rejected():
    with pytest.raises(ValueError, match="unknown attack"):
        parse_attack("cw:8")
