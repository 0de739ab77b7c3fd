"""The attack flag in the product (issue 24): GET /jobs/<id> and its metrics through a real Redis and real
workers, and ``motionguard classify --json`` (the same inference code) with a bundle that has a flag."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
import torch
from conftest import ALICE, wait_done, write_video

from models.bundle_meta import read_bundle_meta, write_bundle_meta
from models.defense.flag import INPUT_SIGNALS, calibrate_flag
from service.cli import main


@pytest.mark.integration
def test_job_result_carries_flag_fields_and_metrics(api, tmp_path):
    """The service's bundle has no flag calibration (nor an MC threshold): the fields are there with the
    old flag's meaning (signals = the MC loss), and the signal histogram counts every clip."""
    path = write_video(tmp_path / "v.mp4", count=10, height=80, width=96)
    with open(path, "rb") as handle:
        response = httpx.post(
            f"{api}/classify", params={"steps": 1}, files={"file": ("v.mp4", handle)}, headers=ALICE, timeout=30
        )
    assert response.status_code == 202, response.text
    body = wait_done(api, response.json()["job_id"])
    assert body["status"] == "finished", body
    clips = body["result"]["clips"]
    assert clips
    for clip in clips:
        assert clip["suspected_attack"] is False
        assert "attack_score" in clip and clip["attack_score"] is None  # nothing to score against
        assert clip["signals"]["mc"] == pytest.approx(clip["mc_loss_before"], abs=1e-5)
    metrics = httpx.get(f"{api}/metrics").text
    counts = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("motionguard_attack_signal_count{") and 'signal="mc"' in line
    ]
    assert counts and max(counts) >= len(clips)


@pytest.fixture(scope="module")
def flag_bundle(random_bundle, tmp_path_factory):
    """The random bundle with a flag fitted to made-up clean values (the scale is what matters here)."""
    target = tmp_path_factory.mktemp("flagged") / "bundle"
    shutil.copytree(random_bundle, target)
    g = torch.Generator().manual_seed(0)
    values = {name: (torch.rand(50, generator=g) * 0.01).tolist() for name in (*INPUT_SIGNALS, "purify_change")}
    flag = calibrate_flag(values, fpr=0.02, auto_quantile=0.5)
    write_bundle_meta(target, read_bundle_meta(target).model_copy(update={"flag": flag}))
    return target


def _classify(path, bundle, capsys, *extra) -> dict:
    assert main(["classify", str(path), "--bundle", str(bundle), "--json", "--steps", "1", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_classify_json_reads_every_signal_and_decides_auto_on_the_score(flag_bundle, tmp_path, capsys):
    path = write_video(tmp_path / "v.mp4", count=8, height=64, width=64)
    result = _classify(path, flag_bundle, capsys)
    flag = read_bundle_meta(flag_bundle).flag
    for clip in result["clips"]:
        assert set(INPUT_SIGNALS) <= set(clip["signals"])
        assert "purify_change" in clip["signals"]  # defend=always purified it
        assert isinstance(clip["attack_score"], float)
        assert clip["suspected_attack"] == (clip["attack_score"] > 1)
    # The random bundle's signals are far above the made-up clean values: every clip is flagged, and
    # defend=auto (deciding on the flag's score) purifies every clip.
    assert all(c["suspected_attack"] for c in result["clips"])
    auto = _classify(path, flag_bundle, capsys, "--defend", "auto")
    assert [c["decision"] for c in auto["clips"]] == ["purified"] * len(auto["clips"])
    assert auto["defense"]["decided_on"] == "attack_score"
    assert auto["defense"]["threshold"] == pytest.approx(flag.auto_threshold / flag.thresholds["input"])
    # Raise the bar above every clip: auto skips them all, and nothing is flagged.
    meta = read_bundle_meta(flag_bundle)
    lenient = meta.flag.model_copy(update={"thresholds": {"input": 1e6, "defended": 1e6}, "auto_threshold": 1e6})
    write_bundle_meta(flag_bundle, meta.model_copy(update={"flag": lenient}))
    skipped = _classify(path, flag_bundle, capsys, "--defend", "auto")
    assert [c["decision"] for c in skipped["clips"]] == ["skipped"] * len(skipped["clips"])
    assert not any(c["suspected_attack"] for c in skipped["clips"])
    assert all("purify_change" not in c["signals"] for c in skipped["clips"])
