"""The results table and the report's goals: n, Wilson intervals, McNemar p-values, proxy cells, failed baselines."""

import csv
import io
import json

import pytest

from post.report import goals, write_report
from post.stats import mcnemar_exact, wilson_interval
from post.table import METHOD_KEYS, METHODS, TableConfig, build_table, classify, table

TARGET = "tiny-target"
N = 40


def _run(root, name, result, correct=None, labels=None):
    """A finished run directory; ``correct`` (per example) writes predictions.json for it."""
    d = root / name
    d.mkdir(parents=True)
    (d / "result.json").write_text(json.dumps(result))
    if correct is not None:
        labels = labels or [i % 2 for i in range(len(correct))]
        pred = [y if ok else 1 - y for y, ok in zip(labels, correct)]
        (d / "predictions.json").write_text(json.dumps({"split": "test", "indices": list(range(len(correct))),
                                                        "labels": labels, "predicted": pred}))
    return d


def _eval(accuracy, prompt=None, n=N, **kw):
    return {"stage": "evaluate", "split": "test", "model": TARGET, "task": "mr", "prompt": prompt,
            "accuracy": accuracy, "n": n, "class_names": ["negative", "positive"], "seconds": 3.0, **kw}


def _tune(model, train_seconds, **kw):
    """A tune run's result (the fields every tune run writes, post.results.TuneResult's required ones)."""
    return {"stage": "tune", "model": model, "task": "mr", "dp": False, "prompt": "prompt.safetensors", "n_train": N,
            "train_seconds": train_seconds, **kw}


def _prompt(method, model="student", eps=None):
    return {"method": method, "model": model, "source_model": "student", "epsilon": eps,
            "delta": 1e-4 if eps else None, "path": None}


@pytest.fixture
def runs(tmp_path):
    post_ok = [True] * 30 + [False] * 10  # 75%
    zs_ok = [i % 2 == 0 for i in range(N)]  # 50%
    # PT on Φs: right where POST is, except 8 of POST's right answers: b = 8, c = 0
    src_ok = [True] * 22 + [False] * 18
    _run(tmp_path, "zero-shot", _eval(0.5), zs_ok)
    _run(tmp_path, "eval-source", _eval(22 / N, _prompt("tuned"), model="student"), src_ok)
    _run(tmp_path, "eval-post", _eval(0.75, _prompt("post", model=TARGET)), post_ok)
    _run(tmp_path, "eval-proxy", _eval(0.6, _prompt("tuned"), method="proxy", proxy_source_model="student"),
         [True] * 24 + [False] * 16)
    _run(tmp_path, "eval-direct", _eval(0.55, _prompt("tuned")))  # no predictions saved: p-value blank
    _run(tmp_path, "tune-target", _tune(TARGET, 60.0, test_accuracy=0.8,
                                        test={"n": N, "class_names": ["negative", "positive"]}))
    return tmp_path, {"post": post_ok, "zs": zs_ok, "src": src_ok}


def test_cells_carry_n_interval_and_predictions(runs):
    root, ok = runs
    post = classify(root / "eval-post", TARGET)
    assert post.method == "POST" and post.n == N and post.num_classes == 2 and len(post.predictions) == N
    assert post.interval == wilson_interval(30, N)
    proxy = classify(root / "eval-proxy", TARGET)
    assert proxy.method == "proxy tuning" and not proxy.dp  # not mistaken for direct transfer
    assert classify(root / "eval-direct", TARGET).method == "direct transfer"
    # prompt files name a local model directory "local:<name>"; the run names its path
    local = _run(root, "eval-local", _eval(0.6, _prompt("tuned", model="local:student"), model=str(root / "student")))
    assert classify(local, TARGET).method == "PT on Φs"
    pt = classify(root / "tune-target", TARGET)
    assert pt.method == "PT on Φt" and pt.n == N and pt.predictions is None


def test_csv_has_sizes_intervals_and_mcnemar_against_each_baseline(runs, tmp_path):
    root, ok = runs
    cells = [classify(root / d, TARGET) for d in ("zero-shot", "eval-source", "eval-post", "eval-proxy",
                                                   "eval-direct", "tune-target")]
    md, text = build_table(cells)
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(text))}
    assert list(rows) == [m for m in METHODS if m in rows]
    header = next(csv.reader(io.StringIO(text)))
    assert {"n", "ci_low", "ci_high", "run"} <= set(header)
    assert {f"p_value_vs_{METHOD_KEYS[m]}" for m in METHODS} <= set(header)
    post = rows["POST"]
    low, high = wilson_interval(30, N)
    assert post["n"] == str(N) and float(post["ci_low"]) == pytest.approx(low, abs=1e-4)
    assert float(post["ci_high"]) == pytest.approx(high, abs=1e-4) and post["run"].endswith("eval-post")
    want_src = mcnemar_exact(ok["post"], ok["src"])
    assert (want_src["b"], want_src["c"]) == (8, 0)
    assert float(post["p_value_vs_pt_source"]) == pytest.approx(want_src["p_value"], rel=1e-5)
    assert float(post["p_value_vs_zero_shot_target"]) == pytest.approx(
        mcnemar_exact(ok["post"], ok["zs"])["p_value"], rel=1e-5)
    assert post["p_value_vs_proxy"] != ""
    assert post["p_value_vs_direct"] == "" and post["p_value_vs_pt_target"] == ""  # no predictions for those
    assert rows["PT on Φs"]["p_value_vs_post"] == ""  # only POST rows are tested
    # Markdown: every accuracy with its interval and n; the p-values under the table.
    assert f"75.0 [{100 * low:.1f}–{100 * high:.1f}] n=40" in md and "proxy tuning" in md
    assert "POST vs each method on the same test sentences, exact McNemar p: " in md


def test_p_value_needs_the_same_sentences(runs):
    root, ok = runs
    other = _run(root, "zs-other", _eval(0.5, n=N - 1), ok["zs"][:-1])  # one sentence fewer
    cells = [classify(root / "eval-post", TARGET), classify(other, TARGET)]
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(build_table(cells)[1]))}
    assert rows["POST"]["p_value_vs_zero_shot_target"] == ""


def test_old_runs_without_n_keep_working(tmp_path):
    d = _run(tmp_path, "old", _tune(TARGET, None, test_accuracy=0.5))
    md, text = build_table([classify(d, TARGET)])
    row = next(csv.DictReader(io.StringIO(text)))
    assert row["n"] == "" and row["ci_low"] == "" and row["p_value_vs_post"] == "" and "| 50.0 |" in md


def test_table_stage_writes_the_csv(runs, tmp_path):
    root, ok = runs
    r = table(TableConfig(runs=[root], target=TARGET), tmp_path / "table")
    assert r.cells == 6 and "p_value_vs_pt_source" in (tmp_path / "table" / "table.csv").read_text()


def _goal_cells(pt_acc, pt_n=N):
    lo, hi = wilson_interval(round(pt_acc * pt_n), pt_n)
    base = {"task": "mr", "dp": "False", "num_classes": "2"}
    return [{**base, "method": "POST", "accuracy": "0.75", "n": str(N), "ci_low": "0.6", "ci_high": "0.86",
             "p_value_vs_pt_source": "0.0078", "p_value_vs_zero_shot_target": "0.01", "p_value_vs_pt_target": "",
             "p_value_vs_calibrated_zero_shot_target": "0.086"},
            {**base, "method": "PT on Φs", "accuracy": "0.55", "n": str(N)},
            {**base, "method": "zero-shot Φt", "accuracy": "0.5", "n": str(N)},
            {**base, "method": "calibrated zero-shot Φt", "accuracy": "0.7", "n": str(N)},
            {**base, "method": "PT on Φt", "accuracy": str(pt_acc), "n": str(pt_n), "ci_low": str(lo),
             "ci_high": str(hi)}]


def test_goals_flag_a_baseline_at_chance():
    failed = goals(_goal_cells(0.55))  # 22 of 40: the interval holds 0.5
    assert failed[0]["PT on Φt failed"] is True and failed[0]["≥ 95% of PT on Φt"] is True
    fine = goals(_goal_cells(0.8))
    assert fine[0]["PT on Φt failed"] is False and fine[0]["≥ 95% of PT on Φt"] is False  # 0.75 < 0.95 × 0.8
    assert goals(_goal_cells(0.78))[0]["≥ 95% of PT on Φt"] is True  # 0.75 ≥ 0.741
    assert fine[0]["p_value_vs_pt_source"] == pytest.approx(0.0078) and fine[0]["n"] == N


def test_goals_count_a_beat_only_when_it_is_significant():
    """POST 75% vs calibrated 70% is higher, but p = 0.086: not the significant gain the bar asks for."""
    g = goals(_goal_cells(0.8))[0]
    assert g["beats calibrated zero-shot Φt"] is True and g["significant_vs_calibrated_zero_shot_target"] is False
    assert g["beats zero-shot Φt"] is True and g["significant_vs_zero_shot_target"] is True  # p = 0.01
    no_p = goals([{**c, "p_value_vs_zero_shot_target": ""} for c in _goal_cells(0.8)])[0]
    assert no_p["beats zero-shot Φt"] is True and no_p["significant_vs_zero_shot_target"] is None
    lower = goals([{**c, "accuracy": "0.9"} if c["method"] == "zero-shot Φt" else c for c in _goal_cells(0.8)])[0]
    assert lower["beats zero-shot Φt"] is False and lower["significant_vs_zero_shot_target"] is False


def _pipeline_dir(root, cells):
    (root / "table").mkdir(parents=True)
    with open(root / "table" / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, sorted({k for c in cells for k in c}))
        w.writeheader()
        w.writerows(cells)
    (root / "table" / "table.md").write_text("table")
    (root / "pipeline-result.json").write_text(json.dumps({"task": "mr", "target": TARGET, "steps": {}}))
    return root


def test_report_says_baseline_failed_instead_of_yes(tmp_path):
    write_report(_pipeline_dir(tmp_path / "a", _goal_cells(0.55)))
    md = (tmp_path / "a" / "report.md").read_text()
    goal = next(line for line in md.splitlines() if line.startswith("| mr | non-private"))
    assert "75.0 [60.0–86.0] n=40 | yes (p 0.008) | yes (p 0.010) | higher, not significant (p 0.086) |" in goal
    assert goal.endswith("| baseline failed | baseline failed |")
    write_report(_pipeline_dir(tmp_path / "b", _goal_cells(0.78)))
    goal = next(line for line in (tmp_path / "b" / "report.md").read_text().splitlines()
                if line.startswith("| mr | non-private"))
    assert "baseline failed" not in goal and goal.endswith("| 96% | yes |")


def test_each_dp_epsilon_gets_its_own_table_tests_and_curve(tmp_path):
    """A privacy–utility curve: cells at ε = 8 and ε = 1 must not overwrite each other, and POST is tested
    only against cells of its own ε."""
    from post.report import privacy_curve

    post8, post1, src8, src1 = [True] * 32 + [False] * 8, [True] * 28 + [False] * 12, [True] * 20 + [False] * 20, \
        [False] * 40
    _run(tmp_path, "zero-shot", _eval(0.5), [i % 2 == 0 for i in range(N)])
    _run(tmp_path, "eval-post-dp", _eval(0.8, _prompt("post", model=TARGET, eps=7.9995)), post8)
    _run(tmp_path, "eval-post-dp-eps1", _eval(0.7, _prompt("post", model=TARGET, eps=0.99996)), post1)
    _run(tmp_path, "eval-source-dp", _eval(0.5, _prompt("tuned", eps=7.9995), model="student"), src8)
    _run(tmp_path, "eval-source-dp-eps1", _eval(0.0, _prompt("tuned", eps=0.99996), model="student"), src1)
    _run(tmp_path, "eval-post", _eval(0.85, _prompt("post", model=TARGET)), [True] * 34 + [False] * 6)
    _run(tmp_path, "eval-source", _eval(0.6, _prompt("tuned"), model="student"), [True] * 24 + [False] * 16)
    cells = [c for d in sorted(tmp_path.iterdir()) if (c := classify(d, TARGET)) is not None]
    md, text = build_table(cells)
    rows = list(csv.DictReader(io.StringIO(text)))
    post = {r["setting"]: r for r in rows if r["method"] == "POST"}
    assert set(post) == {"non-private", "DP ε = 8", "DP ε = 1"}
    assert post["DP ε = 1"]["accuracy"] == "0.7000" and post["DP ε = 8"]["accuracy"] == "0.8000"
    # ε = 1's POST against ε = 1's PT on Φs (b = 28, c = 0), not ε = 8's
    assert float(post["DP ε = 1"]["p_value_vs_pt_source"]) == pytest.approx(
        mcnemar_exact(post1, src1)["p_value"], rel=1e-5)
    assert float(post["DP ε = 8"]["p_value_vs_pt_source"]) == pytest.approx(
        mcnemar_exact(post8, src8)["p_value"], rel=1e-5)
    assert md.index("**Non-private**") < md.index("(ε = 8.00") < md.index("(ε = 1.00")
    assert sum(r["method"] == "zero-shot Φt" for r in rows) == 3  # zero-shot heads each table
    goal_rows = goals(rows)
    assert [g["setting"] for g in goal_rows] == ["non-private", "DP ε = 8", "DP ε = 1"]
    curve, png = privacy_curve(rows)
    assert png and "| ε | PT on Φs | POST |" in curve
    assert any(line.startswith("| 1 | 0.0 [") and "| 70.0 [" in line for line in curve)
    assert curve[-2].startswith("| ∞ (non-private) | 60.0 [")
    assert privacy_curve([r for r in rows if r["setting"] != "DP ε = 1"]) == ([], None)  # one DP ε: no curve


def test_cost_counts_training_only_and_splits_user_from_provider(tmp_path):
    """Every method's cost counts the same things (training runs, never evaluation): ps's tuning is the
    user's; the transfer (α, caching, training) and the PT-on-Φt baseline's tuning are the provider's."""
    ps = _run(tmp_path, "tune-source", _tune("student", 60.0))
    tr = _run(tmp_path, "transfer", {"stage": "transfer", "prompt": "prompt.safetensors", "source_model": "student",
                                     "target_model": TARGET, "alpha": 1.0, "mode": "vocab", "steps": 10,
                                     "public": "airline", "public_texts": 20, "train_seconds": 90.0,
                                     "cache_seconds": 12.0, "alpha_seconds": 18.0, "seconds": 500.0})
    (tr / "config.yaml").write_text(f"prompt: {ps / 'prompt.safetensors'}\n")
    pt = _run(tmp_path, "tune-target", _tune(TARGET, 300.0))
    zs = _run(tmp_path, "zero-shot", _eval(0.5))  # its evaluation took 3 s: not a cost of producing anything
    post = _run(tmp_path, "eval-post", _eval(0.75, {**_prompt("post", model=TARGET),
                                                    "path": str(tr / "prompt.safetensors")}))
    src = _run(tmp_path, "eval-source", _eval(0.6, {**_prompt("tuned"), "path": str(ps / "prompt.safetensors")},
                                              model="student"))
    ptc = _run(tmp_path, "eval-target", _eval(0.8, {**_prompt("tuned", model=TARGET),
                                                    "path": str(pt / "prompt.safetensors")}))
    cells = {c.method: c for d in (zs, post, src, ptc) if (c := classify(d, TARGET)) is not None}
    assert (cells["POST"].user_seconds, cells["POST"].provider_seconds) == (60.0, 120.0)
    assert (cells["PT on Φs"].user_seconds, cells["PT on Φs"].provider_seconds) == (60.0, 0.0)
    assert (cells["PT on Φt"].user_seconds, cells["PT on Φt"].provider_seconds) == (0.0, 300.0)
    assert (cells["zero-shot Φt"].seconds, cells["zero-shot Φt"].provider_seconds) == (0.0, 0.0)
    md, text = build_table(list(cells.values()), distill_seconds=1200.0)
    assert "| mr | non-private | 0.0 + 0.0 | 0.0 + 5.0 | 1.0 + 0.0 | 1.0 + 2.0 |" in md
    assert "Distillation (the provider's, one-time" in md and "20.0 min; amortised over 10 users 2.00 min" in md
    row = next(r for r in csv.DictReader(io.StringIO(text)) if r["method"] == "POST")
    assert (row["user_seconds"], row["provider_seconds"], row["seconds"]) == ("60.0", "120.0", "180.0")


def test_cli_table_takes_runs_as_a_repeated_flag(runs, tmp_path):
    from post.cli import main

    root, ok = runs
    assert main(["table", "--runs", str(root / "eval-post"), "--runs", str(root / "zero-shot"), "--target", TARGET,
                 "--out", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "result.json").read_text())["cells"] == 2


def test_settings_key_on_the_epsilon_asked_for():
    from post.table import setting_of

    # calibrated runs spend a hair under their target: 0.5 and 0.55 stay apart, 0.25 stays 0.25
    assert [setting_of(True, e, t) for e, t in ((0.49999999, 0.5), (0.5499999964, 0.55), (0.2499, 0.25))] == \
        [0.5, 0.55, 0.25]
    assert setting_of(True, 7.9995, None) == 8.0 and setting_of(True, 0.0399, None) == 0.0399  # σ given: 3 digits
    assert setting_of(False, None, None) is None and setting_of(True, None, None) == float("inf")


def test_calibrated_zero_shot_is_its_own_untrained_column_in_every_setting(runs):
    root, ok = runs
    cal_ok = [True] * 28 + [False] * 12  # 70%
    cal = _run(root, "eval-calibrated", _eval(0.7, method="calibrated", calibrate_public="airline"), cal_ok)
    cell = classify(cal, TARGET)
    assert cell.method == "calibrated zero-shot Φt" and cell.user_seconds == 0.0 and cell.provider_seconds == 0.0
    dp_post = _run(root, "eval-post-dp", _eval(0.75, _prompt("post", model=TARGET, eps=8.0)), ok["post"])
    cells = [classify(root / d, TARGET) for d in ("zero-shot", "eval-post")] + [cell, classify(dp_post, TARGET)]
    md, text = build_table(cells)
    rows = list(csv.DictReader(io.StringIO(text)))
    cal_rows = [r for r in rows if r["method"] == "calibrated zero-shot Φt"]
    assert len(cal_rows) == 2  # heads the non-private and the DP table alike, like zero-shot
    for post in (r for r in rows if r["method"] == "POST"):
        assert float(post["p_value_vs_calibrated_zero_shot_target"]) == pytest.approx(
            mcnemar_exact(ok["post"], cal_ok)["p_value"], rel=1e-5)
    assert md.count("| task | zero-shot Φt | calibrated zero-shot Φt | ") == 2  # right after zero-shot, both tables
    # a calibrated evaluation of a prompt is no cell: it must not stand in for that prompt's own (POST) cell
    prompted = _run(root, "eval-post-calibrated", _eval(0.9, _prompt("post", model=TARGET), method="calibrated",
                                                        calibrate_public="airline"), cal_ok)
    assert classify(prompted, TARGET) is None
    # absent runs leave the column out (it is optional)
    assert "calibrated zero-shot Φt" not in build_table([classify(root / "eval-post", TARGET)])[0]
