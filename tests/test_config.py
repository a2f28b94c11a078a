"""Pipeline configuration: every shipped pipeline validates; bad input names the field and what was expected."""

from pathlib import Path

import pytest
import yaml

from sims_platform.cli import main
from sims_platform.config import ConfigError, config_from_dict, load_config

PIPELINES = sorted(Path(__file__).parents[1].joinpath("pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_validate(path):
    load_config(path)


def test_unknown_key_is_rejected_with_its_path(tiny_cfg):
    data = tiny_cfg.model_dump()
    data["train_base"]["batch_sise"] = 3
    with pytest.raises(ConfigError, match=r"train_base\.batch_sise: unknown key"):
        config_from_dict(data)


@pytest.mark.parametrize("key,value,expected", [
    (("evaluate", "methods"), [{"name": "sims", "weights": [0.0, -1.0]}], r"evaluate\.methods\.0\.weights: .*>= 0"),
    (("evaluate", "methods"), [{"name": "sims", "weights": [1]}, {"name": "sims", "weights": [2]}],
     r"evaluate\.methods: .*once"),
    (("evaluate", "methods"), [{"name": "dance", "weights": [1]}], r"evaluate\.methods\.0\.name: .*'neon'"),
    (("data", "holdout_fraction"), 0.0, r"data\.holdout_fraction: .*greater than 0"),
    (("train_base", "batch_size"), 0, r"train_base\.batch_size: .*greater than or equal to 1"),
    (("generate", "sampler", "steps"), "many", r"generate\.sampler\.steps: .*integer"),
    (("data", "source"), "imagenet", r"data\.source: .*'digits', 'folder' or 'webdataset'"),
    (("finetune_aux", "optimizer", "betas"), [0.9, 1.5], r"finetune_aux\.optimizer\.betas: .*\[0, 1\)"),
    (("name",), "Bad Name", r"name: .*pattern"),
])
def test_bad_values_name_the_field(tiny_cfg, key, value, expected):
    data = tiny_cfg.model_dump()
    node = data
    for k in key[:-1]:
        node = node[k]
    node[key[-1]] = value
    with pytest.raises(ConfigError, match=expected):
        config_from_dict(data, "p.yaml")


def test_missing_budget_and_cross_field_rules(tiny_cfg):
    data = tiny_cfg.model_dump()
    del data["finetune_aux"]
    with pytest.raises(ConfigError, match=r"finetune_aux: required field is missing"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["evaluate"]["methods"] = [{"name": "cfg", "weights": [1.0]}]
    with pytest.raises(ConfigError, match="label_dropout"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0], "guide_images": 512}]
    with pytest.raises(ConfigError, match="train_base.snapshots"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["iterations"] = {"feed_method": "neon"}
    with pytest.raises(ConfigError, match="feed_method 'neon' is not one of evaluate.methods"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["finetune_aux"]["init"] = {"mode": "transfer"}
    with pytest.raises(ConfigError, match="rampup_images: init.mode 'transfer' warms the learning rate up"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["evaluate"] = {"method": "sims", "weights": [0, 1]}  # the old form names its replacement
    with pytest.raises(ConfigError, match="replaced by evaluate.methods"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["iterations"] = {"count": 2, "train_data": "real+synthetic"}
    with pytest.raises(ConfigError, match="feed_samples"):
        config_from_dict(data)
    data = tiny_cfg.model_dump()
    data["data"] = {"source": "folder"}
    with pytest.raises(ConfigError, match="data.path is required"):
        config_from_dict(data)


def test_cli_validate_reports_errors_and_exit_code(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain_base: {images: -5}\nfinetune_aux: {images: 10}\nbogus: 1\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train_base.images" in err and "bogus: unknown key" in err and str(bad) in err
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    notyaml = tmp_path / "x.yaml"
    notyaml.write_text("a: [1,\n")
    assert main(["validate", str(notyaml)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_overrides_are_typed_and_validated(tmp_path):
    demo = PIPELINES[0].with_name("digits.yaml")  # the demo: evaluate.methods may be replaced by neon alone
    cfg = load_config(demo, ["seed=3", "evaluate.methods=[{name: neon, weights: [2, 0]}]"])
    assert cfg.seed == 3 and cfg.evaluate.methods[0].weights == [0.0, 2.0]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config(demo, ["seed"])


def test_configs_that_cannot_run_fail_validate(tmp_path, capsys):
    """Standard metrics need their weights; pretrained networks and published references are named by URI."""
    import yaml
    from pipeline_support import tiny_config_dict

    d = tiny_config_dict(str(tmp_path / "run"))
    d["evaluate"]["features"] = "inception"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 2
    assert "evaluate.inception_weights is required when evaluate.features is 'inception'" in capsys.readouterr().err

    d["evaluate"].update(features="digits-classifier", reference="s3://refs/img512.pkl")
    with pytest.raises(ConfigError, match="evaluate.reference holds EDM2 statistics of inception/dinov2"):
        config_from_dict(d)
    d["evaluate"].pop("reference")
    d["pretrained"] = {"guide": "s3://models/edm2-img512-xs-0134217-0.165.pkl"}
    with pytest.raises(ConfigError, match="pretrained.guide is autoguidance's guide network"):
        config_from_dict(d)
    d["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0]}]  # a pretrained guide needs no snapshot
    assert config_from_dict(d).pretrained.guide.endswith("0.165.pkl")


def test_inconsistent_reference_sources_fail_validate_naming_the_field(tmp_path, capsys):
    """data.reference_path is read like data.path and replaces the held-out split; `sims validate` rejects it with
    the digits source, equal to data.path, or together with published statistics (evaluate.reference)."""
    import yaml
    from pipeline_support import tiny_config_dict

    d = tiny_config_dict(str(tmp_path / "run"))
    path = tmp_path / "p.yaml"
    d["data"]["reference_path"] = "s3://b/val-{0..3}.tar"
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 2
    assert "data.reference_path is read like data.path, which needs data.source 'folder' or 'webdataset'" in \
        capsys.readouterr().err

    d["data"] |= {"source": "webdataset", "path": "s3://b/val-{0..3}.tar/"}
    with pytest.raises(ConfigError, match=r"data\.reference_path is data\.path .*the reference would be the training"):
        config_from_dict(d)

    d["data"]["path"] = "s3://b/train-{0..9}.tar"
    d["evaluate"] |= {"features": "inception", "inception_weights": "s3://b/w.pth",
                      "reference": "s3://b/img512.pkl"}
    path.write_text(yaml.safe_dump(d))
    assert main(["validate", str(path)]) == 2
    assert "data.reference_path and evaluate.reference both name the reference" in capsys.readouterr().err
    d["evaluate"].pop("reference")
    cfg = config_from_dict(d)
    ref = cfg.data.reference_data()
    assert (ref.path, ref.reference_path, ref.max_images, ref.source) == ("s3://b/val-{0..3}.tar", None, None,
                                                                          "webdataset")


def test_imagenet512_values_name_pretrained_networks_and_metrics_by_uri():
    import yaml

    pipeline = yaml.safe_load((Path(__file__).parent.parent / "values-imagenet512.yaml").read_text())["pipeline"]
    cfg = config_from_dict(pipeline)
    assert cfg.pretrained.base.startswith("s3://") and cfg.pretrained.base.endswith(".pkl")
    assert cfg.evaluate.features == "inception" and cfg.evaluate.inception_weights.startswith("s3://")
    # the reference is ImageNet val, all of it, not published statistics computed on ImageNet train
    assert cfg.evaluate.reference is None and cfg.evaluate.inception_sha256 == \
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    assert cfg.data.reference_path.startswith("s3://") and "/val/" in cfg.data.reference_path
    assert cfg.data.source == "webdataset" and "/train/" in cfg.data.path
    # reduced precision, as EDM2: mixed-precision training (bf16 autocast over fp32 weights), fp16 sampling
    assert (cfg.train_base.distributed.precision, cfg.finetune_aux.distributed.precision) == ("bf16", "bf16")
    assert (cfg.generate.sampler.precision, cfg.evaluate.sampler.precision) == ("fp16", "fp16")
    assert cfg.runtime.tf32 is False
    # the VAE comes from the bucket, pinned by the sha256 of its weights (no hub at run time)
    assert cfg.encoder.vae.startswith("s3://") and cfg.encoder.vae_sha256 is not None


def test_validate_names_an_unpinned_vae(tmp_path, capsys):
    """`sims validate` rejects a VAE URI without a sha256 and a hub id without a revision, naming the field."""
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINES[0].read_text())
    assert main(["validate", str(path), "--set", "encoder.kind=latent", "--set",
                 "encoder.vae=s3://bucket/models/vae"]) == 2
    err = capsys.readouterr().err
    assert "encoder.vae_sha256 is required" in err and "Traceback" not in err
    assert main(["validate", str(path), "--set", "encoder.kind=latent"]) == 2  # the hub id default, no revision
    assert "encoder.vae_revision is required" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "encoder.kind=latent", "--set", "encoder.vae=s3://bucket/vae",
                 "--set", f"encoder.vae_sha256={'ab' * 32}"]) == 0


@pytest.mark.parametrize("features", ["inception", "dinov2"])
def test_standard_features_need_their_weights(tmp_path, capsys, features):
    """`sims validate` rejects evaluate.features inception/dinov2 with no weights, naming the field."""
    base = PIPELINES[0].read_text()
    path = tmp_path / "p.yaml"
    path.write_text(base)
    assert main(["validate", str(path), "--set", f"evaluate.features={features}"]) == 2
    err = capsys.readouterr().err
    assert f"evaluate.{features}_weights is required" in err and str(path) in err
    digest = "ab" * 32
    cfg = load_config(path, [f"evaluate.features={features}", f"evaluate.{features}_weights=s3://b/w.pth",
                             f"evaluate.{features}_sha256={digest}"])
    assert cfg.evaluate.feature_weights() == ("s3://b/w.pth", digest)
    with pytest.raises(ConfigError, match=rf"evaluate\.{features}_sha256: .*pattern"):
        load_config(path, [f"evaluate.{features}_sha256=abc"])


def test_validate_reads_a_helm_values_file(capsys):
    """`sims validate values-imagenet512.yaml` validates its pipeline: section, not the chart's keys."""
    values = Path(__file__).parent.parent / "values-imagenet512.yaml"
    assert main(["validate", str(values)]) == 0
    out = capsys.readouterr().out
    assert "Helm values file" in out and "unknown key" not in out
    assert "data.path: s3://" in out and "not checked" in out  # no credentials here: said, not guessed


def test_set_indexes_lists_and_names_its_own_errors(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINES[0].read_text())
    cfg = load_config(path, ["evaluate.methods.0.weights=[0.5]"])
    assert cfg.evaluate.methods[0].weights == [0.5]
    n = len(cfg.evaluate.methods)
    with pytest.raises(ConfigError, match=rf"--set evaluate.methods.7.name=neon: evaluate.methods is a list of "
                                          rf"{n} entries; index it with 0..{n - 1}"):
        load_config(path, ["evaluate.methods.7.name=neon"])
    assert main(["validate", str(path), "--set", "generate=5"]) == 2
    err = capsys.readouterr().err
    assert "generate: expected a mapping of its fields (got 5) [from --set generate=5]" in err
    assert "GenerateConfig" not in err


def test_a_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match=r"train_base\.batch_sise: unknown key \(did you mean 'batch_size'\?\)"):
        load_config(PIPELINES[0], ["train_base.batch_sise=3"])
    with pytest.raises(ConfigError, match=r"evaluate\.methods\.0\.weigths: unknown key \(did you mean 'weights'"):
        load_config(PIPELINES[0], ["evaluate.methods.0.weigths=[1]"])


def test_validate_checks_local_data_paths(tmp_path, capsys):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINES[0].read_text())
    missing = tmp_path / "no-such-folder"
    assert main(["validate", str(path), "--set", "data.source=folder", "--set", f"data.path={missing}"]) == 2
    assert f"data.path: folder {missing} does not exist" in capsys.readouterr().err
    assert main(["validate", str(path), "--set", "data.source=webdataset", "--set",
                 f"data.path={tmp_path}/shard-{{0..3}}.tar"]) == 2
    assert "data.path: shard" in capsys.readouterr().err
    (tmp_path / "images" / "a").mkdir(parents=True)
    assert main(["validate", str(path), "--set", "data.source=folder", "--set", f"data.path={tmp_path}/images",
                 "--set", "data.num_classes=1"]) == 0


def test_an_imported_base_needs_a_named_guide_for_autoguidance():
    d = yaml.safe_load(PIPELINES[0].read_text())
    d["evaluate"]["methods"] = [{"name": "autoguidance", "weights": [1.0], "guide_images": 1024}]
    d["train_base"]["snapshots"] = [1024]
    d.pop("loop", None)
    d.pop("guide", None)  # a trained guide would guide the imported base (tests/test_guide.py)
    d["pretrained"] = {"base": "s3://bucket/models/base.pkl"}
    d["finetune_aux"]["init"] = {"mode": "transfer"}  # an imported base has no training state to resume
    d["finetune_aux"]["optimizer"] = {"lr": 0.01, "rampup_images": 1000}
    with pytest.raises(ConfigError, match="imported .*set pretrained.guide"):
        config_from_dict(d)
    d["pretrained"]["guide"] = "s3://bucket/models/guide.pkl"
    config_from_dict(d)


def test_configs_that_would_fail_late_fail_validate(capsys):
    """A seed whose sample seeds overflow int64 would fail in generate, a snapshot past the budget after training."""
    from sims_platform.config.schema import MAX_SEED
    from sims_platform.stages.seeds import sample_seeds

    # The largest seed any stream asks for: the last iteration (iterations.count <= 999), the feed stream.
    last = sample_seeds(MAX_SEED, 998, "feed", 1, 10**9 - 1)
    assert int(last[0]) == ((MAX_SEED * 1000 + 998) * 10 + 3) * 10**9 + 10**9 - 1 < 2**63
    assert main(["validate", "pipelines/quick.yaml", "--set", f"seed={MAX_SEED + 1}"]) == 2
    assert f"seed: Input should be less than or equal to {MAX_SEED}" in capsys.readouterr().err
    assert main(["validate", "pipelines/quick.yaml", "--set", "train_base.snapshots=[1024, 5000]"]) == 2
    assert "train_base.snapshots: [5000] lie outside 1..images (4096)" in capsys.readouterr().err


def test_a_config_file_that_is_not_text_is_one_line(tmp_path, capsys):
    bad = tmp_path / "pipeline.yaml"
    bad.write_bytes(b"name: x\nseed: \xa1\xff\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a UTF-8 text file (byte 14)" in err
