"""The evaluation harness: rows, resume, shards, reproducible JSON, intervals, worst case, the report."""

from __future__ import annotations

import json

import pytest
import torch

from models.bundle.load import load_bundle
from models.robustness.evaluate import clip_seed, evaluate, plan_rows
from models.robustness.report import auroc, bootstrap_ci, sanity_checks, summarise, worst_case
from models.robustness.spec import parse_attack
from service.cli import main
from worker.cli.eval_report import BEGIN, END, replace_section, write_section


def _rec(defended: bool, mc: float = 0.01, standard: bool = False) -> dict:
    return {"standard": standard, "random": standard, "defended": defended, "mc_before": mc, "mc_after": mc}


def test_auroc_known_values():
    assert auroc([0.1, 0.2], [0.3, 0.4]) == 1.0
    assert auroc([0.3, 0.4], [0.1, 0.2]) == 0.0
    assert auroc([0.1, 0.2], [0.1, 0.2]) == 0.5


def test_bootstrap_interval_is_seeded_and_brackets_the_share():
    flags = [True] * 30 + [False] * 70
    low, high = bootstrap_ci(flags)
    assert bootstrap_ci(flags) == [low, high] and low < 30.0 < high and high - low < 25
    assert bootstrap_ci([True] * 5) == [100.0, 100.0] and bootstrap_ci([]) is None


def test_worst_case_needs_every_attack_to_fail_and_counts_flags():
    threshold = 0.05
    clips = {
        "clean": {0: _rec(True), 1: _rec(True), 2: _rec(False), 3: _rec(True)},
        "pgd:8": {0: _rec(True), 1: _rec(False, mc=0.09), 2: _rec(True), 3: _rec(True)},
        "through:8": {0: _rec(True), 1: _rec(True), 2: _rec(True), 3: _rec(False)},
        "pgd:4": {0: _rec(False)},  # another budget: its own worst case
    }
    (w4, w8) = worst_case(clips, threshold)
    assert w8["name"] == "worst-case:8" and w8["n"] == 4 and w8["rows"] == ["clean", "pgd:8", "through:8"]
    assert w8["defended"]["value"] == 25.0  # only clip 0 survives clean and both attacks
    assert w8["correct_or_flagged"]["value"] == 50.0  # clip 1 was wrong but flagged
    assert w4["n"] == 1 and w4["defended"]["value"] == 0.0
    rows = {r["name"]: r for r in summarise(clips, threshold)["rows"]}
    assert rows["pgd:8"]["flagged"] == 25.0 and rows["pgd:8"]["correct_or_flagged"]["value"] == 100.0
    assert rows["pgd:8"]["defended"]["ci95"] is not None


def test_sanity_checks_detect_non_monotone_steps():
    clips = {
        "pgd:8:steps=10": {0: _rec(False, standard=False)},
        "pgd:8": {0: _rec(False, standard=True)},
        "pgd:64": {0: _rec(False)},
    }
    checks = sanity_checks(clips)
    assert checks["pgd:8 monotone"] is False
    assert checks["large_budget_undefended_accuracy"] == 0.0


def test_rows_resume_and_shards_give_the_same_records(random_bundle, tmp_path):
    """A clip's record depends only on (row, clip, seed): two shards and a resumed run reproduce one run."""
    pipeline = load_bundle(random_bundle).pipeline
    clips = [torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    calls: list[int] = []

    def source(i: int):
        calls.append(i)
        return clips[i], i % 3

    attacks = [parse_attack("pgd:8:steps=2:check=1"), parse_attack("bpda:8:steps=1"), parse_attack("pgd:4:steps=1:n=1")]
    rows = plan_rows(range(2), attacks, random_n=1, adaptive_n=2)
    assert [(r.name, r.indices) for r in rows] == [
        ("clean", [0, 1]),
        ("random", [0]),
        ("pgd:8:check=1:steps=2", [0, 1]),
        ("bpda:8:steps=1", [0, 1]),
        ("pgd:4:n=1:steps=1", [0]),
    ]
    sharded = plan_rows(range(2), attacks, random_n=1, adaptive_n=2, shard=(1, 2))
    assert [r.indices for r in sharded] == [[1], [], [1], [1], []]
    whole = evaluate(pipeline, source, rows, threshold=0.05, state_path=tmp_path / "all.json")
    calls.clear()
    again = evaluate(pipeline, source, rows, threshold=0.05, state_path=tmp_path / "all.json")
    assert calls == [] and again.rows == whole.rows
    merged: dict = {}
    for part in (0, 1):
        shard_rows = plan_rows(range(2), attacks, random_n=1, adaptive_n=2, shard=(part, 2))
        state = evaluate(pipeline, source, shard_rows, threshold=0.05)
        for name, recs in state.rows.items():
            merged.setdefault(name, {}).update(recs)

    def strip(saved: dict) -> dict:  # timings are not results
        return {
            n: {i: {k: v for k, v in r.items() if k != "seconds"} for i, r in recs.items()} for n, recs in saved.items()
        }

    assert strip(merged) == strip(whole.rows)
    assert clip_seed(0, "pgd:8", 1) != clip_seed(0, "pgd:8", 2) != clip_seed(0, "bpda:8", 1)


@pytest.fixture(scope="module")
def video_folder(random_bundle, tmp_path_factory):
    from conftest import write_video

    folder = tmp_path_factory.mktemp("videos")
    for label in range(3):
        (folder / f"class{label}").mkdir()
        write_video(folder / f"class{label}" / "a.mp4", count=6, height=64, width=64, seed=label)
    return folder


def test_same_command_twice_gives_identical_json_and_report_merges(random_bundle, video_folder, tmp_path, capsys):
    out = tmp_path / "eval.json"
    command = [
        "eval", "--bundle", str(random_bundle), "--videos", str(video_folder), "--n", "2", "--random-n", "0",
        "--attacks", "pgd:8:steps=2:check=1,through:8:steps=1:unroll=1", "--json", str(out),
    ]  # fmt: skip
    assert main(command) == 0
    first = out.read_bytes()
    for suffix in (".state.json", ".json"):
        out.with_suffix(suffix).unlink()
    assert main(command) == 0
    assert out.read_bytes() == first
    report = json.loads(first)
    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["cpu"]
    assert [r["name"] for r in report["rows"]] == ["clean", "pgd:8:check=1:steps=2", "through:8:steps=1:unroll=1"]
    assert all(r["defended"]["ci95"] is not None for r in report["rows"])
    assert out.with_suffix(".cost.json").is_file()
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n## Robustness\n\nold table\n\n## Deploy\n\nkept\n")
    capsys.readouterr()
    assert main(["eval", "report", str(out), "--readme", str(readme), "--first", "1"]) == 0
    text = readme.read_text()
    assert "old table" not in text and "## Deploy\n\nkept" in text and "worst-case:8" in text
    merged = capsys.readouterr().out
    assert "| through:8:steps=1:unroll=1 | 2 |" in merged
    # A glob over the folder (`eval report DIR/*.json`) also names the run's sidecars: they are skipped.
    sidecars = [str(out.with_suffix(s)) for s in (".cost.json", ".state.json")]
    assert main(["eval", "report", str(out), *sidecars, "--readme", str(readme), "--first", "1"]) == 0
    assert capsys.readouterr().out == merged


def test_report_refuses_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert main(["eval", "report", str(bad)]) == 2
    assert "not a motionguard-eval/2 report" in capsys.readouterr().err
    assert main(["eval", "report", str(tmp_path / "missing.json")]) == 2
    sidecar = tmp_path / "run.cost.json"
    sidecar.write_text("{}")
    assert main(["eval", "report", str(sidecar)]) == 2
    assert "no eval report among the files" in capsys.readouterr().err


def test_replace_section_keeps_the_rest():
    text = "# t\n\n## Robustness\n\nold\n\n## Next\n\nrest\n"
    assert replace_section(text, "## Robustness\n\nnew\n") == "# t\n\n## Robustness\n\nnew\n\n## Next\n\nrest\n"
    assert replace_section("# t\n", "## Robustness\n\nnew\n").endswith("## Robustness\n\nnew\n")


def test_generated_section_goes_between_the_markers_of_any_page():
    page = f"# Robustness\n\nintro\n\n{BEGIN}\n\nold\n\n{END}\n\n## Reading the rows\n\nkept\n"
    once = write_section(page, "new table\n")
    assert once == f"# Robustness\n\nintro\n\n{BEGIN}\n\nnew table\n\n{END}\n\n## Reading the rows\n\nkept\n"
    assert write_section(once, "new table") == once
    # A page without the markers (the README of earlier versions) gets them in its Robustness section.
    text = write_section("# t\n\n## Robustness\n\nold\n\n## Next\n\nrest\n", "new")
    assert text == f"# t\n\n## Robustness\n\n{BEGIN}\n\nnew\n\n{END}\n\n## Next\n\nrest\n"
    assert write_section(text, "newer") == text.replace("\nnew\n", "\nnewer\n")
    assert write_section("", "new") == f"## Robustness\n\n{BEGIN}\n\nnew\n\n{END}\n"


def test_unknown_attack_is_rejected(capsys):
    with pytest.raises(ValueError, match="unknown attack"):
        parse_attack("cw:8")
    assert main(["eval", "--attacks", "cw:8"]) == 2
    assert "unknown attack" in capsys.readouterr().err


def test_transfer_without_a_source_bundle_is_refused_before_anything_loads(tmp_path, capsys):
    """The check comes first: the (missing) bundle is never read, so a long run cannot fail an hour in."""
    missing = tmp_path / "no-such-bundle"
    assert (
        main(["eval", "--bundle", str(missing), "--attacks", "pgd:8,transfer:8", "--json", str(tmp_path / "e.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert "transfer:8" in err and "--source-bundle" in err and "no-such-bundle" not in err
    assert not (tmp_path / "e.json").exists()


def test_transfer_row_runs_end_to_end_and_records_its_source(
    random_bundle, other_random_bundle, video_folder, tmp_path, capsys
):
    from models.bundle_meta import read_bundle_meta

    out = tmp_path / "transfer.json"
    command = [
        "eval", "--bundle", str(random_bundle), "--source-bundle", str(other_random_bundle), "--videos",
        str(video_folder), "--n", "1", "--clean-n", "0", "--random-n", "0", "--attacks", "transfer:8:steps=2:check=1",
        "--json", str(out),
    ]  # fmt: skip
    assert main(command) == 0
    report = json.loads(out.read_text())
    source = read_bundle_meta(other_random_bundle)
    expected = {"name": source.name, "version": source.version, "sha256": source.sha256}
    assert report["source_bundle"] == expected and report["signature"]["source_bundle"] == source.sha256
    assert source.sha256 != read_bundle_meta(random_bundle).sha256
    assert [r["name"] for r in report["rows"]] == ["transfer:8:check=1:steps=2"] and report["rows"][0]["n"] == 1
    assert "Transfer rows crafted on random-test v0" in capsys.readouterr().out
    # The same rows crafted on another source are another evaluation's: the report will not merge them.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**report, "source_bundle": {**expected, "sha256": {"flow.pth": "0" * 64}}}))
    assert main(["eval", "report", str(out), str(other)]) == 2
    assert "crafted on another source bundle" in capsys.readouterr().err
