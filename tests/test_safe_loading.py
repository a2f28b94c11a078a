"""Nothing read from storage runs code: a planted pickle where a model is expected is refused, naming the file."""

from __future__ import annotations

import io
import os

import pytest
import torch
import yaml

from pipeline_support import tiny_config_dict

from sims_platform.cli import main
from sims_platform.storage import fsio
from sims_platform.storage.layout import RunLayout
from sims_platform.storage.safe_pickle import UnsafePickleError, load_torch_bytes, restricted_loads


class _Payload:
    """Unpickling this runs os.system (creates the marker file): what an attacker would plant."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(path, marker) -> None:
    buf = io.BytesIO()
    torch.save({"ema": _Payload(str(marker)), "images": 0}, buf)  # a torch.save file, like a real model.pt
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())


def test_load_torch_refuses_a_pickle_that_carries_code(tmp_path):
    model, marker = tmp_path / "model.pt", tmp_path / "pwned"
    _plant(model, marker)
    with pytest.raises(UnsafePickleError, match=r"model\.pt: refused to load: it needs 'posix\.system'"):
        fsio.load_torch(str(model))
    assert not marker.exists()


def test_records_the_platform_writes_still_load(tmp_path):
    uri = str(tmp_path / "record.pt")
    rec = {"ema": {"w": torch.randn(3, 3)}, "images": 5, "meta": [("a", 1.5), None], "opt": {"betas": (0.9, 0.99)}}
    fsio.save_torch(uri, rec)
    back = fsio.load_torch(uri)
    assert torch.equal(back["ema"]["w"], rec["ema"]["w"]) and back["meta"] == [("a", 1.5), None]


def test_stage_generate_refuses_a_planted_model(tmp_path, capsys):
    root = tmp_path / "run"
    cfg_path = tmp_path / "pipeline.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config_dict(str(root))))
    marker = tmp_path / "pwned"
    _plant(root / "iter-00" / "train-base" / "model.pt", marker)  # where train-base would have put it

    rc = main(["stage", "generate", "--config", str(cfg_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "iter-00/train-base/model.pt: refused to load" in err and "Traceback" not in err
    assert not marker.exists()
    assert not fsio.listdir(RunLayout.of(str(root)).shards(0, "generate"))  # nothing sampled from it


def test_deepspeed_files_are_checked_before_deepspeed_reads_them(tmp_path):
    from sims_platform.training.checkpoints import check_native_file

    planted, marker = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt", tmp_path / "pwned"
    _plant(planted, marker)
    with pytest.raises(UnsafePickleError, match=r"optim_states\.pt: refused to load: it needs posix\.system"):
        check_native_file(str(planted), "s3://bucket/ckpt/ds/state/zero_pp_rank_0_mp_rank_00_optim_states.pt")
    ok = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19.8", "buffer_names": []}, ok)
    check_native_file(str(ok), "ok.pt")  # tensors and plain containers pass
    assert not marker.exists()


def test_a_torch_with_a_known_weights_only_bypass_is_refused_at_start(monkeypatch, capsys):
    from sims_platform.cli import main
    from sims_platform.storage import safe_pickle

    monkeypatch.setattr(safe_pickle.torch, "__version__", "2.5.1+cpu")
    assert main(["validate", "pipelines/quick.yaml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch 2.5.1 is installed" in err and ">= 2.6" in err
    monkeypatch.setattr(safe_pickle.torch, "__version__", "2.6.0")
    assert main(["validate", "pipelines/quick.yaml"]) == 0


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2],                      # cut short
    lambda b: b"PK" + bytes(64),                     # a zip header and nothing else
    lambda b: b"\x80\x02]q\x00(K\x01\xffe.",         # an opcode torch's unpickler does not know
    lambda b: b"\x80\x02.",                          # a pickle that stops at once
])
def test_a_damaged_torch_file_is_one_clear_error(damage):
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3)}, buf)
    with pytest.raises(UnsafePickleError, match=r"^model\.pt: not a readable torch file \(.+\)"):
        load_torch_bytes(damage(buf.getvalue()), "model.pt")


def test_a_pickle_frame_larger_than_memory_is_one_clear_error():
    frame = b"\x80\x04\x95" + (2**63 - 1).to_bytes(8, "little") + b"."
    with pytest.raises(UnsafePickleError, match=r"^net\.pkl: not a readable pickle of the expected format"):
        restricted_loads(frame, {}, "net.pkl")
