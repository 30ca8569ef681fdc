"""`make demo` runs the whole pipeline; this is its smaller version, end to end."""

import json

from tests.conftest import load_tool


def test_small_demo_runs_end_to_end(tmp_path, capsys):
    demo = load_tool("demo")
    out, data = tmp_path / "demo", tmp_path / "data"
    assert demo.main(["--small", "--out", str(out), "--data", str(data)]) == 0
    printed = capsys.readouterr().out
    assert "mINP" in printed and "random init (chance)" in printed and "+ fine-tuned" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"random init (chance)", "GA-DMS pretrained, direct transfer", "+ fine-tuned (IRRA recipe)"}
    for row in results.values():
        assert 0 <= row["R1"] <= row["R5"] <= row["R10"] <= 100
    for name in ("gass_tokens.png", "retrieval.png", "curves_pretrain.png", "curves_finetune.png"):
        assert (out / "figures" / name).stat().st_size > 1000, name
        assert str(out / "figures" / name) in printed
    for run in ("pretrain", "finetune"):
        assert (out / run / "last.pth").exists() and (out / run / "metrics.jsonl").exists()
    # A second run reuses the generated data instead of regenerating it.
    demo.ensure_data(data, demo.SyntheticConfig(**demo.SIZES["small"].data, seed=0))
    assert "reusing" in capsys.readouterr().out
