"""benchmarks.common: interleaved runs and the goals judged on them."""

from benchmarks import common


def test_interleaved_runs_alternate_baseline_then_stage():
    calls = []
    runs = common.interleaved(lambda: calls.append("stage") or 2, lambda: calls.append("base") or 1, runs=3)
    assert calls == ["base", "stage"] * 3
    assert [(r["baseline"][1], r["stage"][1]) for r in runs] == [(1, 2)] * 3
    assert all(r["stage"][0] >= 0 for r in runs)


def test_a_goal_on_every_run_is_judged_on_the_worst(tmp_path):
    args = dict(unit="x/s", baseline={"what": "b", "value": 100.0}, out_dir=tmp_path)
    every = {"bar": 2.0, "direction": "higher"}
    met = common.write_result("a", 250.0, goal=every, goal_on="every_run", run_ratios=[2.5, 2.1, 2.4], **args)
    assert met["goal_met"] is True and met["ratio"] == 2.5 and met["run_ratios"] == [2.5, 2.1, 2.4]
    missed = common.write_result(
        "b", 250.0, goal=every, goal_on="every_run", run_ratios=[2.5, 1.9, 2.4], **args
    )
    assert missed["goal_met"] is False  # the median passes; one run does not
    median = common.write_result("c", 250.0, goal=every, run_ratios=[2.5, 1.9, 2.4], **args)
    assert median["goal_met"] is True  # judged on the ratio of the medians
    lower = {"bar": 1.0, "direction": "lower"}
    assert (
        common.write_result("d", 90.0, goal=lower, goal_on="every_run", run_ratios=[0.8, 1.1], **args)[
            "goal_met"
        ]
        is False
    )
