"""A resumed run is tied to what produced it: each completion record carries a digest of the settings and inputs
that shaped it; a rerun under other settings is refused with the stage, the changed keys and the fix, and
`--redo-from STAGE` redoes that stage and what reads it, keeping the rest."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from pipeline_support import tiny_config_dict

from sims_platform.cli import main
from sims_platform.config import config_from_dict
from sims_platform.pipeline.provenance import plan_provenance, step_name
from sims_platform.pipeline.runner import run_pipeline


@pytest.fixture(autouse=True)
def _local_store(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """One complete tiny run; each test works on its own copy."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        root = tmp_path_factory.mktemp("prov") / "run"
        run_pipeline(config_from_dict(tiny_config_dict(str(root))))
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    return root


def _copy(finished: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run and a pipeline file whose storage.root is the copy."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    cfg = tmp_path / "pipeline.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config_dict(str(run))))
    return run, cfg


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): _digest(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _records(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_text() for p in sorted(run.rglob("_SUCCESS.json"))}


def _refused(capsys, argv: list[str]) -> list[str]:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()


def test_records_carry_the_digest(finished):
    rec = json.loads((finished / "iter-00" / "generate" / "_SUCCESS.json").read_text())
    prov = rec["provenance"]
    assert len(prov["digest"]) == 64 and prov["settings"]["generate"]["sampler"]["steps"] == 4
    assert list(prov["inputs"]) == ["iter-00/train-base"]
    assert "storage" not in json.dumps(prov["settings"]) and "runtime" not in prov["settings"]


def test_a_changed_sampler_is_refused_then_redone_from_generate(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    base = run / "iter-00" / "train-base"
    base_record, base_model = (base / "_SUCCESS.json").read_text(), _digest(base / "model.pt")
    samples = _files(run / "iter-00" / "generate" / "shards")
    before = _records(run)

    argv = ["run", "--config", str(cfg), "--set", "generate.sampler.steps=3"]
    lines = _refused(capsys, argv)
    assert len(lines) == 3  # generate and the two stages that read it, a line each
    assert "iter-00/generate" in lines[0] and "generate.sampler.steps" in lines[0]
    assert "--redo-from generate" in lines[0]
    assert any("iter-00/finetune-aux" in line for line in lines)
    assert not any("train-base" in line or "reference" in line for line in lines)
    assert _records(run) == before  # a refused run changes nothing

    assert main(argv + ["--redo-from", "generate"]) == 0
    assert _files(run / "iter-00" / "generate" / "shards") != samples  # new samples
    assert (base / "_SUCCESS.json").read_text() == base_record and _digest(base / "model.pt") == base_model
    rec = json.loads((run / "iter-00" / "generate" / "_SUCCESS.json").read_text())
    assert rec["provenance"]["settings"]["generate"]["sampler"]["steps"] == 3

    capsys.readouterr()
    assert main(argv) == 0  # now it matches: everything is kept
    assert "already complete" in capsys.readouterr().out


def test_a_changed_aux_budget_is_redone_from_finetune_aux_only(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    samples = _files(run / "iter-00" / "generate")
    aux = _digest(run / "iter-00" / "finetune-aux" / "model.pt")

    argv = ["run", "--config", str(cfg), "--set", "finetune_aux.images=256"]
    lines = _refused(capsys, argv)
    assert len(lines) == 2 and "iter-00/finetune-aux" in lines[0] and "finetune_aux.images" in lines[0]
    assert "--redo-from finetune-aux" in lines[0] and "iter-00/evaluate" in lines[1]

    assert main(argv + ["--redo-from", "finetune-aux"]) == 0
    assert _files(run / "iter-00" / "generate") == samples
    assert _digest(run / "iter-00" / "finetune-aux" / "model.pt") != aux


def test_an_unchanged_rerun_skips_everything(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    before = _records(run)
    assert main(["run", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert out.count("already complete (") == len(before) == 5
    assert _records(run) == before


def test_a_copy_resumed_with_a_new_storage_root_keeps_its_stages(finished, tmp_path):
    run, _ = _copy(finished, tmp_path)
    before = _records(run)
    run_pipeline(config_from_dict(tiny_config_dict(f"file://{run}")))  # another spelling of another root
    assert _records(run) == before


def test_sims_stage_refuses_a_record_of_other_settings_unless_forced(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    argv = ["stage", "generate", "--config", str(cfg), "--set", "generate.sampler.steps=3"]
    lines = _refused(capsys, argv)
    assert len(lines) == 1 and "generate" in lines[0] and "generate.sampler.steps" in lines[0]
    assert "--force" in lines[0]
    samples = _files(run / "iter-00" / "generate" / "shards")
    assert main(argv + ["--force"]) == 0
    rec = json.loads((run / "iter-00" / "generate" / "_SUCCESS.json").read_text())
    assert rec["provenance"]["settings"]["generate"]["sampler"]["steps"] == 3
    assert _files(run / "iter-00" / "generate" / "shards") != samples  # sampled anew, not the old shards relabelled


def test_a_record_without_a_digest_is_refused(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    marker = run / "iter-00" / "evaluate" / "_SUCCESS.json"
    rec = json.loads(marker.read_text())
    del rec["provenance"]
    marker.write_text(json.dumps(rec))
    lines = _refused(capsys, ["run", "--config", str(cfg)])
    assert len(lines) == 1 and "iter-00/evaluate" in lines[0] and "predates" in lines[0]
    assert "--redo-from evaluate" in lines[0]


def test_redo_from_an_unknown_stage_names_the_valid_ones(finished, tmp_path, capsys):
    _, cfg = _copy(finished, tmp_path)
    lines = _refused(capsys, ["run", "--config", str(cfg), "--redo-from", "iter-03/generate"])
    assert len(lines) == 1 and "--redo-from iter-03/generate" in lines[0] and "finetune-aux" in lines[0]


@pytest.mark.slow
def test_parts_and_one_process_resume_each_other(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    before = _records(run)
    shutil.rmtree(run / "iter-00" / "evaluate")
    assert main(["run", "--config", str(cfg), "--parts", "2"]) == 0  # evaluate in 2 parts, the rest kept
    parts = {p.name for p in (run / "iter-00" / "evaluate" / "parts").glob("*/part-*.pt")}
    assert parts == {"part-00000-of-00002.pt", "part-00001-of-00002.pt"}
    after = _records(run)
    assert {k: v for k, v in after.items() if "evaluate" not in k} == \
        {k: v for k, v in before.items() if "evaluate" not in k}
    capsys.readouterr()
    assert main(["run", "--config", str(cfg)]) == 0  # one process: everything complete, nothing refused
    assert capsys.readouterr().out.count("already complete (") == 5
    assert _records(run) == after


def _digests(d: dict) -> dict[str, str]:
    return {step_name(s): p.digest for s, p in plan_provenance(config_from_dict(d)).items()}


def test_digests_follow_what_each_step_reads(tmp_path):
    one = tiny_config_dict(str(tmp_path / "run"))
    two = {**one, "iterations": {"count": 2, "train_data": "real+synthetic", "feed_samples": 8}}
    a, b = _digests(one), _digests(two)
    assert {k: b[k] for k in a} == a  # iteration 0 does not read how later iterations train
    more = _digests({**two, "iterations": {**two["iterations"], "feed_samples": 16}})
    assert [k for k in b if more[k] != b[k]] == ["iter-00/feed", "iter-01/train-base", "iter-01/generate",
                                                 "iter-01/finetune-aux", "iter-01/evaluate"]
    loop = {**one, "loop": {"arms": ["standard", "sims"], "feed_fractions": [0.5], "generations": 3}}
    aux = _digests({**loop, "finetune_aux": {**one["finetune_aux"], "images": 256}})
    changed = {k for k, d in _digests(loop).items() if aux[k] != d}
    assert "sims-dp50/iter-01/train-base" in changed  # its feed is guided by generation 0's aux
    assert "sims-dp50/iter-01/finetune-aux" in changed and "iter-00/generate" not in changed
    longer = _digests({**loop, "loop": {**loop["loop"], "generations": 4}})
    assert all(longer[k] == d for k, d in _digests(loop).items())  # more generations extend the run


def test_dry_run_shows_what_each_stage_would_do_and_changes_nothing(finished, tmp_path, capsys):
    run, cfg = _copy(finished, tmp_path)
    before = _files(run)

    def plan(*extra: str) -> dict[str, str]:
        capsys.readouterr()
        assert main(["run", "--config", str(cfg), "--dry-run", *extra]) == 0
        out = capsys.readouterr().out
        lines = out[out.index("(nothing was run):"):].splitlines()[1:]
        return {line.split()[0]: " ".join(line.split()[1:]) for line in lines}

    assert set(plan().values()) == {"done"}
    changed = plan("--set", "generate.sampler.steps=3")
    assert changed["iter-00/train-base"] == "done"
    assert changed["iter-00/generate"] == "to redo (made with different settings (generate.sampler.steps))"
    assert changed["iter-00/finetune-aux"].startswith("to redo (made from inputs that changed since")
    assert plan("--redo-from", "finetune-aux")["iter-00/finetune-aux"] == "to redo"
    shutil.rmtree(run / "iter-00" / "evaluate")
    assert plan()["iter-00/evaluate"] == "to run"
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(tiny_config_dict(str(tmp_path / "new"))))
    capsys.readouterr()
    assert main(["run", "--config", str(fresh), "--dry-run"]) == 0
    assert "done" not in capsys.readouterr().out.split("(nothing was run):")[1]
    assert _files(run) == {k: v for k, v in before.items() if not k.startswith("iter-00/evaluate")}
    assert not (tmp_path / "new").exists()
