"""The goodput benchmark's figures, from synthetic progress lines and failure logs (the runs are the script's
business): the failure stream, which steps are kept, where the wall time went, and the projection."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, loaded_script


@pytest.fixture(scope="module")
def bench():
    with loaded_script("bench_goodput") as module:
        yield module


def start(step: int, ts: float) -> dict:
    return {"event": "start", "step": step, "ts": ts}


def steps(first: int, last: int, first_ts: float) -> list[dict]:
    """Steps ``first``..``last``, a second apart, the first logged at ``first_ts``."""
    return [{"event": "step", "step": s, "ts": first_ts + (s - first)} for s in range(first, last + 1)]


def done(step: int, ts: float) -> dict:
    return {"event": "done", "step": step, "ts": ts}


def spent(bench, pieces) -> dict[str, float]:
    return {key: round(value, 6) for key, value in bench.totals(pieces).items() if value}


# --- the stream ---


def test_a_stream_is_the_seeds_and_its_steps_strictly_increase(bench) -> None:
    stream = bench.draw_stream(3, 60, 12, bench.DEFAULT_MIX)
    assert stream == bench.draw_stream(3, 60, 12, bench.DEFAULT_MIX)
    assert stream != bench.draw_stream(4, 60, 12, bench.DEFAULT_MIX)
    assert [f.step for f in stream] == sorted({f.step for f in stream})
    assert all(1 <= f.step < 60 for f in stream)
    assert {f.kind for f in stream} <= set(bench.KINDS)


def test_a_long_stream_has_the_mean_gap_and_the_mix_asked_for(bench) -> None:
    stream = bench.draw_stream(1, 200_000, 12, bench.DEFAULT_MIX)
    gaps = [b.step - a.step for a, b in itertools.pairwise(stream)]
    assert statistics.mean(gaps) == pytest.approx(12, rel=0.03)
    assert min(gaps) == 1, "a failure right after the one before is kept, not drawn again"
    for kind, share in bench.DEFAULT_MIX.items():
        assert sum(f.kind == kind for f in stream) / len(stream) == pytest.approx(share, abs=0.02), kind


def test_another_failure_rate_gives_the_same_kinds_in_the_same_order(bench) -> None:
    measured = bench.draw_stream(3, 60, 12, bench.DEFAULT_MIX)
    projected = bench.draw_stream(3, 60 * 48, 12 * 48, bench.DEFAULT_MIX)
    assert [f.kind for f in projected[: len(measured)]] == [f.kind for f in measured]


def test_a_kind_with_no_weight_is_never_drawn(bench) -> None:
    mix = bench.parse_mix("sync-hang=0")
    assert mix["sync-hang"] == 0
    assert sum(mix.values()) == pytest.approx(1)
    assert all(f.kind != "sync-hang" for f in bench.draw_stream(3, 5000, 12, mix))


@pytest.mark.parametrize("text", ["4:sync-raise,4:reward-raise", "8:sync-raise,4:reward-raise", "4:explode", "x:y"])
def test_a_stream_given_by_hand_must_be_readable_and_increasing(bench, text: str) -> None:
    with pytest.raises(ValueError):
        bench.parse_stream(text)


def test_a_stream_given_by_hand_names_its_faults(bench) -> None:
    stream = bench.parse_stream("4:sync-raise, 8:trainer-killed")
    assert [f.spec for f in stream] == ["update_weights:raise@4", "reward:exit@8"]


def test_the_fault_log_is_read_back_as_the_streams_failures(bench) -> None:
    log = [
        {"ts": 9.0, "spec": "reward:exit@8", "step": 8},
        {"ts": 5.0, "spec": "update_weights:raise@4", "step": 4},
        {"ts": 6.0, "orphan_pid": 1234},
    ]
    assert bench.fired_failures(log) == [
        bench.Fired(5.0, "sync-raise", 4),
        bench.Fired(9.0, "trainer-killed", 8),
    ]


# --- where the wall time went ---


def test_a_loop_that_resumes_from_the_periodic_save_loses_the_steps_since_it(bench) -> None:
    # Start-up to 10 s, steps 1-7 a second apart, the sync of step 8 raises at 17.9; the relaunch starts at 30 from
    # the save at 5 and trains 6-10 again; done at 35.5, the launcher gone at 37.
    progress = [start(0, 10.0), *steps(1, 7, 11.0), start(5, 30.0), *steps(6, 10, 31.0), done(10, 35.5)]
    fired = [bench.Fired(17.9, "sync-raise", 8)]
    pieces = bench.partition(progress, fired, 0.0, 37.0, finished=True)
    assert spent(bench, pieces) == {
        "start-up": 10.0,
        "productive": 10.0,  # steps 1-5 of the first attempt, 6-10 of the second
        "work lost": 2.9,  # steps 6 and 7 trained and trained again, and step 8 up to its failed sync
        "recovery": 12.1,  # the failure to the relaunched job's start
        "finish": 2.0,
    }
    assert sum(p.end - p.start for p in pieces) == pytest.approx(37.0)
    (figures,) = bench.failure_figures(progress, fired, pieces, job_starts=[5.0, 25.0])
    assert figures["resumed_at_step"] == 5
    assert figures["steps_redone"] == 3, "6, 7 and 8: the failed sync's step was trained"
    assert figures["lost_s"] == pytest.approx(15.0)
    assert figures["back_after_s"] == pytest.approx(14.1), "step 7, the furthest reached, logged again at 32"
    assert figures["overhead_s"] == pytest.approx(7.1)
    assert figures["job_startup_s"] == pytest.approx(5.0)
    assert bench.saved_at_failure([figures], save_freq=5) == [False]


def test_a_step_saved_at_its_failed_sync_is_kept_and_nothing_is_redone(bench) -> None:
    progress = [start(0, 10.0), *steps(1, 7, 11.0), start(8, 25.0), *steps(9, 10, 26.0), done(10, 27.5)]
    fired = [bench.Fired(17.9, "sync-raise", 8)]
    segments = bench.step_segments(progress, fired)
    cut = next(s for s in segments if not s.logged)
    assert (cut.step, cut.completed, cut.kept) == (8, True, True), "step 8's training is the one the run kept"
    pieces = bench.partition(progress, fired, 0.0, 28.0, finished=True)
    assert spent(bench, pieces) == {"start-up": 10.0, "productive": 9.9, "recovery": 7.1, "finish": 1.0}
    (figures,) = bench.failure_figures(progress, fired, pieces, job_starts=[5.0, 20.0])
    assert (figures["steps_redone"], figures["lost_s"]) == (0, pytest.approx(7.1))
    assert figures["back_after_s"] == pytest.approx(7.1), "the relaunch resumed past step 7"
    assert bench.saved_at_failure([figures], save_freq=5) == [True]


def test_a_failure_inside_a_step_loses_the_part_of_it_done_even_when_the_step_before_is_saved(bench) -> None:
    progress = [start(0, 10.0), *steps(1, 7, 11.0), start(7, 25.0), *steps(8, 10, 26.0), done(10, 28.5)]
    fired = [bench.Fired(17.9, "generate-raise", 8)]
    pieces = bench.partition(progress, fired, 0.0, 29.0, finished=True)
    assert spent(bench, pieces) == {
        "start-up": 10.0,
        "productive": 10.0,
        "work lost": 0.9,
        "recovery": 7.1,
        "finish": 1.0,
    }
    (figures,) = bench.failure_figures(progress, fired, pieces, job_starts=[5.0, 20.0])
    assert (figures["trained_step"], figures["steps_redone"]) == (7, 0)
    assert bench.saved_at_failure([figures], save_freq=5) == [True]


def test_a_hang_nothing_ends_is_recovery_until_the_cut_off(bench) -> None:
    progress = [start(0, 10.0), *steps(1, 7, 11.0)]
    fired = [bench.Fired(17.9, "sync-hang", 8)]
    pieces = bench.partition(progress, fired, 0.0, 60.0, finished=False)
    assert spent(bench, pieces) == {"start-up": 10.0, "productive": 7.0, "work lost": 0.9, "recovery": 42.1}
    (figures,) = bench.failure_figures(progress, fired, pieces, job_starts=[5.0])
    assert figures["resumed_at_step"] is figures["steps_redone"] is figures["back_after_s"] is None
    assert figures["overhead_s"] is None
    assert bench.saved_at_failure([figures], save_freq=5) == [None]


def test_a_second_failure_while_the_run_trains_steps_again_is_charged_what_it_threw_away(bench) -> None:
    # The trainer killed in step 8 (at 17.5); the relaunch resumes from 5 and trains 6-8 again; the generation
    # of step 9 raises (at 33.5), before the run got past where it was; the third attempt resumes from 5 again.
    progress = [start(0, 10.0), *steps(1, 7, 11.0), start(5, 30.0), *steps(6, 8, 31.0)]
    progress += [start(5, 45.0), *steps(6, 10, 46.0), done(10, 50.5)]
    fired = [bench.Fired(17.5, "trainer-killed", 8), bench.Fired(33.5, "generate-raise", 9)]
    pieces = bench.partition(progress, fired, 0.0, 51.0, finished=True)
    assert spent(bench, pieces) == {
        "start-up": 10.0,
        "productive": 10.0,
        "work lost": 6.0,
        "recovery": 24.0,
        "finish": 1.0,
    }
    first, second = bench.failure_figures(progress, fired, pieces, job_starts=[5.0, 25.0, 40.0])
    assert (first["work_lost_s"], first["recovery_s"]) == (pytest.approx(2.5), pytest.approx(12.5))
    assert (second["work_lost_s"], second["recovery_s"]) == (pytest.approx(3.5), pytest.approx(11.5))
    assert (first["steps_redone"], second["steps_redone"]) == (2, 3)
    assert (first["back_after_s"], second["back_after_s"]) == (pytest.approx(14.5), pytest.approx(14.5))
    assert bench.saved_at_failure([first, second], save_freq=5) == [False, False]


def test_an_attempt_that_ends_with_no_failure_fired_is_other_time(bench) -> None:
    progress = [start(0, 10.0), *steps(1, 3, 11.0), start(0, 20.0), *steps(1, 4, 21.0), done(4, 24.5)]
    pieces = bench.partition(progress, [], 0.0, 25.0, finished=True)
    # Steps 1-3 trained and trained again, and the restart: nothing explains them.
    assert spent(bench, pieces) == {"start-up": 10.0, "productive": 4.0, "other": 10.0, "finish": 1.0}


def test_kinds_are_summed_with_their_spread_over_the_failures_the_run_came_back_from(bench) -> None:
    figures = [
        {"kind": "sync-raise", "lost_s": 10.0, "steps_redone": 0, "resumed_at_step": 4},
        {"kind": "sync-raise", "lost_s": 14.0, "steps_redone": 2, "resumed_at_step": 10},
        {"kind": "sync-raise", "lost_s": 11.0, "steps_redone": 0, "resumed_at_step": 21},
        {"kind": "sync-raise", "lost_s": 300.0, "steps_redone": None, "resumed_at_step": None},
        {"kind": "trainer-killed", "lost_s": 30.0, "steps_redone": 4, "resumed_at_step": 10},
    ]
    table = bench.by_kind(figures)
    assert (table["sync-raise"]["fired"], table["sync-raise"]["never_recovered"]) == (4, 1)
    assert table["sync-raise"]["lost_s"] == {"median": 11.0, "min": 10.0, "max": 14.0, "n": 3}
    assert table["trainer-killed"]["steps_redone"] == {"median": 4, "min": 4, "max": 4, "n": 1}
    assert "sync-hang" not in table


def recovery_record(name: str) -> object:
    from types import SimpleNamespace

    return SimpleNamespace(workdir=f"/runs/{name}")


def test_a_comparison_is_invalid_when_a_finished_run_differs_or_a_failure_fired_twice(bench) -> None:
    stream = bench.parse_stream("4:sync-raise,8:trainer-killed")
    met = [{"step": 4, "kind": "sync-raise"}, {"step": 8, "kind": "trainer-killed"}]

    def run(name: str, finished: bool, same: bool | None, failures: list[dict], other: float = 0.0) -> object:
        figures = {
            "finished": finished,
            "same_weights_as_reference": same,
            "spent_s": {"other": other},
            "unexplained_restarts": 1 if other else 0,
        }
        record = recovery_record(name)
        return bench.Run(name, name, record, (0.0, 0.0), figures, failures)

    reference = run("fault-free", True, None, [])
    good = run("supervisor", True, True, met)
    stuck = run("torchrun", False, None, met[:1])  # cut off before step 8: not a problem, a finding
    assert bench.validity_problems([reference, good, stuck], stream) == []
    other_weights = run("shell-loop", True, False, met)
    twice = run("kuberay-like", True, True, [*met, met[0]])
    problems = bench.validity_problems([reference, other_weights, twice], stream)
    assert problems == [
        "shell-loop: finished with weights other than the reference's",
        "kuberay-like: a failure fired twice ([(4, 'sync-raise'), (8, 'trainer-killed'), (4, 'sync-raise')]): "
        "the ledger did not hold",
        "kuberay-like: finished without meeting the stream as drawn (met [(4, 'sync-raise'), (8, 'trainer-killed'), "
        "(4, 'sync-raise')])",
    ]
    assert bench.validity_problems([run("fault-free", False, None, [])], stream) == [
        "the fault-free reference did not finish: no ETTR can be computed"
    ]
    hung_by_itself = run("supervisor", True, True, met, other=56.4)
    assert bench.validity_problems([reference, hung_by_itself], stream) == [
        "supervisor: 56.4 s of its wall time follow no failure of the stream (1 restarts of its own): it met a "
        "failure the others did not; see /runs/supervisor"
    ]


# --- the projection ---


CLUSTER_ARGS = {"step_s": 100.0, "startup_s": 1000.0, "save_freq": 10, "step_fraction": 0.5}


def test_the_projection_replays_the_stream_against_the_users_cluster(bench) -> None:
    cluster = bench.Cluster(**CLUSTER_ARGS)
    stream = [bench.Failure(15, "sync-raise"), bench.Failure(25, "trainer-killed")]
    loop = {kind: bench.KindCost(50.0, False) for kind in bench.KINDS}
    # 1000 s start-up; steps 1-15 (1500 s); the failed sync: back to 10, 50 + 1000 s; steps 11-24 and half of 25
    # (1450 s); the trainer killed: back to 20, 50 + 1000 s; steps 21-40 (2000 s).
    assert bench.replay(stream, 40, cluster, loop) == {
        "failures": 2,
        "steps_redone": 9,
        "wall_h": round(8050 / 3600, 2),
        "reference_wall_h": round(5000 / 3600, 2),
        "ettr": round(5000 / 8050, 4),
        "work_lost_h": round(950 / 3600, 2),
        "recovery_h": round(2100 / 3600, 2),
    }
    ours = {kind: bench.KindCost(10.0, kind != "trainer-killed") for kind in bench.KINDS}
    projected = bench.replay(stream, 40, cluster, ours)
    # The failed sync's step saved: nothing redone; the kill goes back to the periodic save at 20 (not 15).
    assert (projected["steps_redone"], projected["ettr"]) == (4, round(5000 / 7470, 4))


def test_failures_past_the_runs_end_are_not_met(bench) -> None:
    cluster = bench.Cluster(**CLUSTER_ARGS)
    costs = {kind: bench.KindCost(0.0, True) for kind in bench.KINDS}
    assert bench.replay([bench.Failure(50, "sync-raise")], 40, cluster, costs)["failures"] == 0


def test_the_projection_says_where_each_cost_came_from(bench) -> None:
    cluster = bench.Cluster(sync_deadline_s=60.0, hang_stuck_s=3600.0)
    measured = {
        "sync-raise": {"overhead_s": {"median": 3.0, "min": 3.0, "max": 3.0, "n": 1}},
        "sync-hang": {"overhead_s": {"median": 5.0, "min": 5.0, "max": 5.0, "n": 1}},
        "trainer-killed": {"overhead_s": {"median": 7.0, "min": 7.0, "max": 7.0, "n": 1}},
    }
    costs, sources = bench.projection_costs("supervisor", measured, {"sync-raise": True}, cluster, deadline_used_s=2.0)
    assert costs["sync-raise"] == bench.KindCost(3.0, True)
    assert costs["sync-hang"].overhead_s == 63.0, "the 2 s deadline used here replaced by the user's 60 s"
    assert costs["reward-raise"].overhead_s == 5.0, "not met: the median of the kinds met"
    assert costs["trainer-killed"].saves_at_failure is False
    assert "assumed" in sources["trainer-killed"]
    assert "measured (n=1)" in sources["sync-raise"]
    costs, sources = bench.projection_costs("shell-loop", measured, {}, cluster, deadline_used_s=2.0)
    assert costs["sync-hang"].overhead_s == 5.0 + 3600.0, "no deadline: stuck, then a relaunch like the others"
    assert not any(cost.saves_at_failure for cost in costs.values())
    assert "by construction" in sources["sync-raise"]


def test_a_launcher_saving_at_a_kinds_failures_is_read_from_most_of_them(bench) -> None:
    figures = [{"kind": "sync-raise"}, {"kind": "sync-raise"}, {"kind": "sync-raise"}, {"kind": "reward-raise"}]
    assert bench.kind_saves(figures, [True, False, True, None]) == {"sync-raise": True}


# --- the script, end to end ---


@pytest.mark.ray
@pytest.mark.slow  # about 5 minutes: the benchmark is a script, not a feature
@pytest.mark.timeout(1500)
def test_quick_mode_meets_the_same_failures_under_each_launcher_and_ends_with_the_same_weights(tmp_path) -> None:
    """--quick: steps of 1 s, a save every 5, the sync of step 4 raising and the trainer killed in step 8, under
    the supervisor and a shell loop."""
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "bench_goodput.py"), "--quick", "--out", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["valid"] is True, result["problems"]
    runs = result["runs"]
    assert sorted(runs) == ["fault-free", "shell-loop", "supervisor"]
    redone = {}
    for name in ("supervisor", "shell-loop"):
        figures, failures = runs[name]["figures"], runs[name]["failures"]
        assert figures["finished"] is True
        assert figures["same_weights_as_reference"] is True
        assert [(f["step"], f["kind"]) for f in failures] == [(4, "sync-raise"), (8, "trainer-killed")]
        assert sum(figures["spent_s"].values()) == pytest.approx(figures["wall_s"], abs=0.05)
        assert figures["spent_s"]["other"] == 0, "every second of the run is explained"
        assert 0 < figures["ettr"] < 1
        redone[name] = [f["steps_redone"] for f in failures]
    # The supervisor saves step 4 at its failed sync; the loop has no checkpoint before step 5 and starts over.
    # The killed trainer saves nothing: both go back to step 5 (the supervisor's own save at 4 is older).
    assert redone == {"supervisor": [0, 2], "shell-loop": [4, 2]}
    assert set(result["projection"]["launchers"]) == {"supervisor", "shell-loop"}
    markdown = (tmp_path / "results.md").read_text()
    assert "not a valid comparison" not in markdown
    assert "## Projected to a real cluster" in markdown
    assert (tmp_path / "timeline.png").read_bytes()[:4] == b"\x89PNG"
