"""``motionguard bench throughput``'s arithmetic (no service): the worker's mean batch size from
the jobs' ``result.batch``, the per-setting figures, the ratios against batch limit 1, the plot,
and one-line errors for bad arguments."""

from __future__ import annotations

import pytest

from service.bench.throughput import _ratios, plot, summarise
from service.cli import main


def _sample(e2e_ms: float, clips: int, batch_clips: int, defense_ms: float = 100.0) -> dict:
    return {
        "e2e_ms": e2e_ms,
        "compute_ms": e2e_ms / 2,
        "queue_ms": 1.0,
        "result": {
            "clips": [{}] * clips,
            "batch": {"clips": batch_clips, "jobs": 1},
            "timings_ms": {"defense": defense_ms, "total": e2e_ms / 2},
        },
    }


def test_mean_batch_size_counts_batches_not_jobs():
    """Two one-clip jobs that shared a batch of 2 and one alone: 3 clips in 2 batches (1.5), where
    a mean over jobs would say 1.67."""
    samples = [_sample(1000, 1, 2), _sample(1200, 1, 2), _sample(800, 1, 1, defense_ms=40.0)]
    row = summarise(samples, wall_s=2.0, batch_limit=2, clients=3)
    assert row["clips"] == 3 and row["jobs"] == 3
    assert row["mean_batch_clips"] == 1.5
    assert row["clips_per_s"] == 1.5 and row["jobs_per_s"] == 1.5
    assert row["latency_ms"]["p50"] == 1000.0 and 1190 < row["latency_ms"]["p99"] <= 1200
    assert row["stage_ms_mean"]["defense"] == 80.0 and row["stage_ms_mean"]["figures"] == 0.0


def test_ratios_against_batch_limit_one_at_the_same_client_count(tmp_path):
    one = summarise([_sample(1000, 1, 1)] * 4, wall_s=4.0, batch_limit=1, clients=4)
    eight = summarise([_sample(1030, 1, 4)] * 4, wall_s=2.0, batch_limit=8, clients=4)
    ratios = _ratios([one, eight], delay_ms=50)["clients=4"]
    assert ratios["batch=8"]["clips_per_s_vs_batch1"] == 2.0
    assert ratios["batch=8"]["p99_ms_minus_batch1"] == 30.0 and ratios["batch=8"]["p99_within_batch1_plus_delay"]
    summary = {
        "settings": [one, eight],
        "input": {"frames": 8, "height": 64, "width": 64},
        "bundle": "b v1",
        "defense_steps": 4,
        "device": "cpu",
        "delay_ms": 50.0,
    }
    plot(summary, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("value", ["1,x", "0,2"])
def test_bad_batch_list_is_refused(value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "throughput", "--batch", value])
    assert exc.value.code == 2
    assert "--batch" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--jobs", "0"], "--jobs and --clips"), (["--url", "http://127.0.0.1:9", "--batch", "1,2"], "one --batch value")],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "throughput", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("motionguard: error:") and message in err[0]


def test_an_early_exit_of_the_embedded_service_names_the_workers_error(tmp_path):
    """--device cuda without CUDA ends serve (its worker refuses the device): the bench's error carries
    the worker's one line, not only a pointer to the log."""
    from service.bench.service import _first_error

    log = tmp_path / "serve.log"
    log.write_text("INFO started\nmotionguard: error: device 'cuda' requested but CUDA is not available\nERROR x\n")
    assert _first_error(log) == ": device 'cuda' requested but CUDA is not available"
    log.write_text("INFO nothing wrong here\n")
    assert _first_error(log) == ""
