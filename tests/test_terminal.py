"""What the terminal shows: progress lines without NaN, one-line errors, user-facing help."""

from __future__ import annotations

import pytest
import yaml

from pipeline_support import tiny_config_dict

from sims_platform.utils.progress import Progress


def test_progress_line_before_a_rate_is_known_says_eta_unknown(capsys):
    p = Progress("iter 0 generate", total=100, unit="img", interval=0.0)
    p._emit()  # nothing done yet: no rate
    line = capsys.readouterr().err.strip()
    assert line == "[iter 0 generate] 0/100 img (0%) eta ?", line
    p.update(50)
    line = capsys.readouterr().err.strip()
    assert "nan" not in line and "img/s eta" in line and " 0.0 img/s" not in line, line


def test_progress_resumed_at_shows_no_nan(capsys):
    Progress("iter 0 train-base", total=2048, done=1024, unit="img")
    line = capsys.readouterr().err.strip()
    assert line == "[iter 0 train-base] resumed at 1024/2048 img (50%) eta ?", line




def test_status_without_cluster_credentials_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from sims_platform.cli import main

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-kubeconfig"))
    assert main(["status", "some-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: no Kubernetes cluster credentials") and "KUBECONFIG" in err, err


@pytest.mark.parametrize("stage, needs, writer", [
    ("feed", "iter-00/evaluate/results.json", "evaluate"),
    ("generate", "iter-00/train-base/model.pt", "train-base"),
])
def test_a_stage_run_before_its_inputs_exist_names_the_stage_that_writes_them(tmp_path, capsys, stage, needs,
                                                                               writer):
    from sims_platform.cli import main

    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(str(tmp_path / "run"))))
    sets = ["iterations.count=2", "iterations.train_data=real+synthetic", "iterations.feed_samples=64"]
    argv = ["stage", stage, "--config", str(cfg), *(a for s in sets for a in ("--set", s))]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert needs in err and "Errno" not in err, err
    assert f"written by stage {writer} of iteration 0; run `sims stage {writer} --iteration 0` first" in err, err


def test_training_the_digits_feature_network_reports_its_start_and_progress(tmp_path, capsys):
    from types import SimpleNamespace

    from sims_platform.config import config_from_dict
    from sims_platform.data import load_images
    from sims_platform.metrics.digits_classifier import train_digits_classifier

    data = load_images(config_from_dict(tiny_config_dict(str(tmp_path / "run"))).data)
    train_digits_classifier(SimpleNamespace(images=data.images[:100], labels=data.labels[:100]),
                            cache_uri=str(tmp_path / "cache"), seed=0)
    err = capsys.readouterr().err
    assert "[digits-classifier] training the FID feature network on 100 labelled images" in err, err
    assert "[digits-classifier] done 12/12 epoch (100%)" in err and "nan" not in err, err


def _parsers(parser):
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                yield from _parsers(child)


def test_every_help_text_is_written_for_users_and_lists_the_exit_codes():
    from sims_platform.cli import build_parser

    parser = build_parser()
    top = parser.format_help()
    for code in ("0 ", "1 ", "2 ", "130", "143"):
        assert f"\n  {code}" in top, top
    for p in _parsers(parser):
        text = p.format_help()
        assert p.description, p.prog
        for developer_words in ("register(", "subparsers", "wired into", "the `sims` CLI with"):
            assert developer_words not in text, (p.prog, text)
