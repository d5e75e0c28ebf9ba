"""The quick demo on the real smollm2-135m, mr and airline: every step, the table and the report."""

import csv
import json

import pytest

pytestmark = pytest.mark.integration


def test_quick_demo_end_to_end(tmp_path, capsys):
    from post.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "demo")]) == 0
    out = tmp_path / "demo"
    printed = capsys.readouterr().out
    assert "report:" in printed and "**Non-private**" in printed
    cells = {(c["method"], c["dp"]) for c in csv.DictReader((out / "table" / "table.csv").open())}
    for method in ("zero-shot Φt", "PT on Φt", "PT on Φs", "direct transfer", "ZST", "POST"):
        assert (method, "False") in cells and (method, "True") in cells, method
    ledger = json.loads((out / "tune-source-dp" / "privacy.json").read_text())
    assert ledger["epsilon"] <= 8.0 + 1e-6 and ledger["steps"] == ledger["planned_steps"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "LiRA" in html
