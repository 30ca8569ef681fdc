"""tools/ablate.py: a two-variant ablation end to end (resumable); the noise AUC itself: tests/test_noise_auc.py."""

from __future__ import annotations

import json
import os
import signal

import pytest

from tests.conftest import REPO, load_tool
from utils.config import load_config

ablate = load_tool("ablate")
PRETRAIN = str(REPO / "configs" / "demo" / "tiny_pretrain.yaml")


def test_markdown_table_mean_std_intervals_and_paired_differences():
    runs = [{"R1": 10.0, "R5": 20.0, "R10": 30.0, "mAP": 12.0, "mINP": 5.0, "noise_auc": 0.6},
            {"R1": 14.0, "R5": 20.0, "R10": 30.0, "mAP": 16.0, "mINP": 7.0, "noise_auc": 0.7}]
    table = ablate.markdown_table({"sdm": runs, "gadms": runs[:1]}, [0, 1])
    assert "| SDM | 12.0 ± 2.8 | 20.0 ± 0.0 | 30.0 ± 0.0 | 14.0 ± 2.8 | 6.0 ± 1.4 | – | 0.650 ± 0.071 | – | – |" in table
    assert "| SDM + GASS noise masking + informative MTP (GA-DMS) | 10.0 | 20.0 |" in table
    # Five seeds: the t-interval of the mean (t_0.975,4 = 2.776), and differences paired by seed.
    base = [{**runs[0], "R1": r1, "R1_mix30": r1 - 5} for r1 in (10.0, 12.0, 11.0, 13.0, 14.0)]
    better = [{**r, "R1": r["R1"] + d, "R1_mix30": r["R1_mix30"] + 3} for r, d in zip(base, (1, 2, 3, 2, 2))]
    table = ablate.markdown_table({"sdm": base, "gadms": better}, [0, 1, 2, 3, 4])
    half = 2.776 * 1.5811388 / 5 ** 0.5  # stdev of 10..14 is 1.58
    assert f"| SDM | 12.0 [{12 - half:.1f}, {12 + half:.1f}] | – | – | 7.0 [" in table
    half = 2.776 * 0.7071068 / 5 ** 0.5  # differences 1, 2, 3, 2, 2
    assert f"| 14.0 [11.7, 16.3] | +2.0 [+{2 - half:.1f}, +{2 + half:.1f}] | +0.0 [+0.0, +0.0] | 10.0 [" in table
    assert "| +3.0 [+3.0, +3.0] | +0.000 [+0.000, +0.000] |" in table
    assert ablate.t975(4) == 2.776 and ablate.t975(11) == 2.228 and ablate.t975(100) == 1.96


def test_ablation_end_to_end_and_rerun_reuses_runs(synthetic_root, tmp_path, capsys):
    out, table = tmp_path / "abl", tmp_path / "ablation.md"
    argv = ["--backbone", "random", "--variants", "sdm", "gadms_css", "--seeds", "0", "--epochs", "2", "--data", str(synthetic_root),
            "--out", str(out), "--table", str(table), "data.batch_size=16", "solver.warmup_epochs=1",
            "train.max_steps=2", "log_period=100"]
    assert ablate.main(argv) == 0
    lines = table.read_text().splitlines()
    rows = {line.split(" | ")[0]: line for line in lines if line.startswith("| ") and "variant" not in line}
    assert set(rows) == {"| SDM", "| GA-DMS with CSS scores instead of GASS"}
    for name in ("sdm", "gadms_css"):
        result = json.loads((out / name / "seed0" / "ablation.json").read_text())
        assert 0 <= result["R1"] <= 100 and 0 <= result["noise_auc"] <= 1 and result["best_epoch"] in (0, 1)
        assert 0 <= result["R1_mix30"] <= 100 and 0.2 < result["words_changed_mix30"] < 0.4
        metrics = [json.loads(line) for line in (out / name / "seed0" / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in metrics if r["type"] == "train"] == [0, 1]
    resolved = load_config(str(out / "gadms_css" / "seed0" / "config.yaml"))
    assert resolved.gass.scoring == "css" and resolved.model.loss_names == "sdm+mlm" and resolved.seed == 0
    before = (out / "sdm" / "seed0" / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert ablate.main(argv) == 0   # everything is reused: no training, same table
    assert (out / "sdm" / "seed0" / "metrics.jsonl").read_text() == before
    assert table.read_text().splitlines() == lines
    # A result recorded without the per-kind AUCs gets them from the run's final weights,
    # which are the weights scored at the end of training: the same numbers.
    path = out / "sdm" / "seed0" / "ablation.json"
    full = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in full.items() if not k.startswith("noise_auc_")}))
    assert ablate.main(argv) == 0
    again = json.loads(path.read_text())
    for kind in ablate.NOISE_KINDS:
        assert again[f"noise_auc_{kind}"] == pytest.approx(full[f"noise_auc_{kind}"], abs=1e-6)
    assert (out / "sdm" / "seed0" / "metrics.jsonl").read_text() == before
    assert again["config"] == load_config(str(out / "sdm" / "seed0" / "config.yaml")).to_dict()
    # The robustness columns, likewise, from the selected checkpoint, whose clean queries give the recorded R1.
    path.write_text(json.dumps({k: v for k, v in full.items() if not k.endswith("_mix30")}))
    assert ablate.main(argv) == 0
    again = json.loads(path.read_text())
    assert again["R1_mix30"] == full["R1_mix30"] and again["mAP_mix30"] == full["mAP_mix30"]
    cfg = load_config(str(out / "sdm" / "seed0" / "config.yaml"))
    rows = ablate.noisy_retrieval(cfg, str(out / "sdm" / "seed0" / "best_CUHK-PEDES.pth"), "mix", 0.3)["CUHK-PEDES"]
    clean = next(r for r in rows if r["task"] == "t2i" and r["noise"] == "none")
    assert clean["R1"] == pytest.approx(full["R1"], abs=1e-9) and clean["mAP"] == pytest.approx(full["mAP"], abs=1e-6)

    # Settings that do not change results (logging, workers, threads) still reuse the runs.
    capsys.readouterr()
    assert ablate.main(argv + ["log_period=7", "data.num_workers=1", "num_threads=1"]) == 0
    assert table.read_text().splitlines() == lines
    # Other settings are refused, naming the keys and the run folder; nothing is trained or written.
    assert argv[7:9] == ["--epochs", "2"]
    for changed, named in ((argv + ["solver.lr=1e-2"], "solver.lr: 0.001 in the run, 0.01 asked"),
                           (argv[:8] + ["3"] + argv[9:], "solver.epochs: 2 in the run, 3 asked")):
        capsys.readouterr()
        assert ablate.main(changed) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert named in err and str(out / "sdm" / "seed0") in err and "another --out" in err, err
    assert (out / "sdm" / "seed0" / "metrics.jsonl").read_text() == before
    assert table.read_text().splitlines() == lines


def test_interrupted_run_is_not_recorded_and_rerun_resumes(synthetic_root, tmp_path, monkeypatch, capsys):
    class SigtermAtStep3(ablate.PretrainTask):
        def after_step(self, trainer, batch, out):
            super().after_step(trainer, batch, out)
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "abl"
    argv = ["--backbone", "random", "--variants", "sdm", "--seeds", "0", "--epochs", "2", "--data", str(synthetic_root), "--out", str(out),
            "data.batch_size=16", "solver.warmup_epochs=1", "train.max_steps=2", "log_period=100"]
    monkeypatch.setattr(ablate, "PretrainTask", SigtermAtStep3)
    assert ablate.main(argv) == 1
    assert "interrupted" in capsys.readouterr().err
    run = out / "sdm" / "seed0"
    assert (run / "last.pth").exists() and not (run / "ablation.json").exists()
    monkeypatch.setattr(ablate, "PretrainTask", SigtermAtStep3.__mro__[1])
    assert ablate.main(argv) == 0
    assert "resumed from" in (run / "train.log").read_text()
    assert json.loads((run / "ablation.json").read_text())["best_epoch"] in (0, 1)


def test_one_epoch_shortens_the_warmup_and_a_started_run_with_other_settings_is_refused(synthetic_root, tmp_path,
                                                                                        capsys):
    out = tmp_path / "abl"
    argv = ["--backbone", "random", "--epochs", "1", "--variants", "sdm", "--seeds", "0", "--data", str(synthetic_root), "--out", str(out),
            "data.batch_size=16", "train.max_steps=2", "log_period=100"]
    assert load_config(PRETRAIN).solver.warmup_epochs == 1
    assert ablate.main(argv) == 0
    printed = capsys.readouterr().out
    assert "--epochs 1: warm-up shortened from 1 to 0 epoch(s)" in printed
    run = out / "sdm" / "seed0"
    assert load_config(str(run / "config.yaml")).solver.warmup_epochs == 0
    assert "warm-up shortened to 0 epoch(s)" in (run / "train.log").read_text()
    assert json.loads((run / "ablation.json").read_text())["best_epoch"] == 0

    # A run that was started (a checkpoint, no result yet) is resumed only with its own settings.
    (run / "ablation.json").unlink()
    assert ablate.main(argv + ["masking.random_prob=0.3"]) == 2
    err = capsys.readouterr().err
    assert "holds a started run made with other settings" in err
    assert "masking.random_prob: 0.15 in the run, 0.3 asked" in err


def test_config_differences_ignore_result_neutral_and_absent_keys():
    saved = {"output_dir": "a", "log_period": 5, "solver": {"lr": 0.1, "epochs": 2}, "data": {"num_workers": 0},
             "old_key": 1}
    asked = {"output_dir": "b", "log_period": 50, "solver": {"lr": 0.2, "epochs": 2}, "data": {"num_workers": 8},
             "num_threads": 2}
    assert ablate.config_differences(saved, asked) == ["solver.lr: 0.1 in the run, 0.2 asked"]


def test_epochs_must_be_positive(tmp_path, capsys):
    assert ablate.main(["--epochs", "0", "--out", str(tmp_path / "abl")]) == 2
    assert capsys.readouterr().err == "error: --epochs must be >= 1, got 0\n"


def test_pretrained_backbone_starts_every_run(synthetic_root, tmp_path, monkeypatch, capsys):
    backbone = load_tool("pretrain_backbone")
    tiny = dict(images=32, batch_size=16, epochs=1, captions_per_image=2, warmup_steps=1)
    monkeypatch.setattr(ablate, "settings_for", lambda data: backbone.settings_for(data, **tiny))
    cache, out = tmp_path / "cache", tmp_path / "abl"
    argv = ["--backbone", "pretrained", "--backbone-cache", str(cache), "--variants", "sdm", "--seeds", "0",
            "--epochs", "1", "--data", str(synthetic_root), "--out", str(out), "data.batch_size=16",
            "train.max_steps=1", "log_period=100"]
    assert ablate.main(argv) == 0
    made = sorted(cache.glob("*.pt"))
    assert len(made) == 1 and "trained" in capsys.readouterr().out
    resolved = load_config(str(out / "sdm" / "seed0" / "config.yaml"))
    assert resolved.model.clip.pretrained == str(made[0])
    assert "loaded CLIP weights from" in (out / "sdm" / "seed0" / "train.log").read_text()
    assert ablate.main(argv) == 0  # the backbone and the run are reused
    assert "reused" in capsys.readouterr().out and sorted(cache.glob("*.pt")) == made
