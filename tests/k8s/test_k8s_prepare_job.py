"""`sims k8s prepare-job`: the Indexed Job of `sims prepare`, schema-valid, from the release's settings."""

from __future__ import annotations

import io
import sys

import kubernetes_validate
import pytest
from k8s_support import K8S_VERSIONS, VALUES_FILES, docs_of, sims_parser

from sims_platform.config import ConfigError
from sims_platform.data.prepare import PrepareSpec
from sims_platform.k8s.names import MAX_NAME, is_dns_label
from sims_platform.k8s.prepare_job import prepare_job
from sims_platform.k8s.render import run_specs

SRC, DST = "s3://sims-ml/raw/imagenet/train", "s3://sims-ml/datasets/imagenet-1k/train-512"


def _job(rendered, values: str, *extra: str, monkeypatch, capsys) -> dict:
    from sims_platform.k8s.cli import cmd_prepare_job

    monkeypatch.setattr(sys, "stdin", io.StringIO(rendered(values)))
    args = sims_parser().parse_args(["k8s", "prepare-job", "-", "--src", SRC, "--dst", DST, "--resolution", "512",
                                     *extra])
    assert cmd_prepare_job(args) == 0
    (job,) = docs_of(capsys.readouterr().out)
    return job


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", VALUES_FILES)
def test_prepare_job_validates_against_kubernetes_openapi(rendered, values, version, monkeypatch, capsys):
    job = _job(rendered, values, "--parts", "32", "--parallelism", "12", monkeypatch=monkeypatch, capsys=capsys)
    kubernetes_validate.validate(job, version, strict=True)
    assert job["kind"] == "Job" and is_dns_label(job["metadata"]["name"], MAX_NAME)


def test_prepare_job_runs_every_part_of_sims_prepare_with_the_releases_settings(rendered, monkeypatch, capsys):
    job = _job(rendered, "values-imagenet512.yaml", "--parts", "32", "--parallelism", "12", "--num-classes", "1000",
               monkeypatch=monkeypatch, capsys=capsys)
    settings = run_specs(rendered("values-imagenet512.yaml"))[0].settings
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == 32 and spec["parallelism"] == 12
    assert spec["backoffLimitPerIndex"] == settings.backoff_limit_per_index
    # bad input (exit 2) fails the index at once; a preempted pod is retried for free
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[1]["action"] == "FailIndex" and rules[1]["onExitCodes"]["values"] == [2]
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "prepare" and "sims.io/run" not in labels
    assert labels["kueue.x-k8s.io/queue-name"] == settings.queue
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == settings.image and c["envFrom"][0]["secretRef"]["name"] == settings.s3_secret
    assert "nvidia.com/gpu" not in c["resources"]["requests"] and c["resources"]["requests"]["cpu"] == "4"
    # no pipeline ConfigMap: the data can be prepared before the release that trains on it is installed
    assert "config" not in {v["name"] for v in pod["volumes"]}
    # the command is `sims prepare` with this part's index from JOB_COMPLETION_INDEX, as the parser reads it
    assert c["command"] == ["sims"] and "--index" not in c["args"]
    args = sims_parser().parse_args(c["args"])
    assert args.func.__name__ == "cmd_prepare"
    assert (args.src, args.dst, args.resolution, args.crop, args.count, args.num_classes, args.workers) == \
        (SRC, DST, 512, "dhariwal", 32, 1000, 4)


def test_the_same_destination_gets_the_same_job_name(rendered, monkeypatch, capsys):
    a = _job(rendered, "values-imagenet512.yaml", "--parts", "4", monkeypatch=monkeypatch, capsys=capsys)
    b = _job(rendered, "values-imagenet512.yaml", "--parts", "8", "--cpu", "2", monkeypatch=monkeypatch,
             capsys=capsys)
    assert a["metadata"]["name"] == b["metadata"]["name"]
    assert "--workers" in (args := b["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args[args.index("--workers") + 1] == "2"


def test_paths_the_pods_cannot_resolve_are_refused(rendered):
    settings = run_specs(rendered("values-imagenet512.yaml"))[0].settings
    with pytest.raises(ConfigError, match="--src imagenet/train: give a URI or an absolute path"):
        prepare_job(settings, PrepareSpec(src="imagenet/train", dst=DST, resolution=512), 4)
    with pytest.raises(ConfigError, match="--name Bad_Name"):
        prepare_job(settings, PrepareSpec(src=SRC, dst=DST, resolution=512), 4, name="Bad_Name")
