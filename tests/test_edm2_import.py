"""EDM2 checkpoints: an EDM2-layout pickle imports without running its code and computes what it was written from."""

from __future__ import annotations

import copy
import io
import os
import pickle

import pytest
import torch

from edm2_support import edm2_pickle

from sims_platform.cli import main
from sims_platform.config import ConfigError
from sims_platform.models.edm2_pickle import load_edm2, read_edm2, read_pickle
from sims_platform.models.precond import Precond
from sims_platform.pipeline.execute import run_stage
from sims_platform.stages.context import StageContext
from sims_platform.storage import fsio
from sims_platform.pipeline.runner import open_run
from sims_platform.storage.safe_pickle import UnsafePickleError

# A small EDM2 network: EDM2's own argument names, as its train_edm2.py passes them to Precond.
INIT_KWARGS = dict(img_resolution=8, img_channels=1, label_dim=10, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], dropout=0.0, use_fp16=True)


def _source_net() -> Precond:
    torch.manual_seed(1)
    kw = {k: v for k, v in INIT_KWARGS.items() if k != "use_fp16"}
    net = Precond(**kw).eval()
    with torch.no_grad():  # trained-looking gains (EDM2 initialises them to zero, which hides bugs)
        for p in net.parameters():
            if p.ndim == 0:
                p.fill_(0.7)
    return net


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    return x, torch.tensor([0.05, 1.0, 20.0]), torch.tensor([1, 4, 9])


def test_edm2_pickle_imports_and_reproduces_the_forward_pass(tmp_path):
    src, marker = _source_net(), tmp_path / "pwned"
    path = tmp_path / "network-snapshot-0134217-0.100.pkl"
    path.write_bytes(edm2_pickle(src, INIT_KWARGS, str(marker)))

    net = load_edm2(str(path))
    assert not marker.exists()  # the module source in the pickle was never executed
    assert not net.training and all(p.dtype == torch.float32 and not p.requires_grad for p in net.parameters())
    want = copy.deepcopy(src).half().float()  # EDM2 stores float16; imported float32 holds the same values
    x, sigma, y = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, y), want(x, sigma, y))
        d, logvar = net(x, sigma, y, return_logvar=True)
        assert torch.equal(logvar, want(x, sigma, y, return_logvar=True)[1])
    info = read_edm2(str(path))
    assert info.images == 134217000 and info.kwargs["model_channels"] == 16 and info.kwargs["clip_act"] == 256


def test_import_edm2_cli_writes_a_model_any_stage_loads(tmp_path, tiny_cfg):
    src = _source_net()
    pkl, dst = tmp_path / "edm2-img8-xs-0134217-0.125.pkl", tmp_path / "models" / "xs.pt"
    pkl.write_bytes(edm2_pickle(src, INIT_KWARGS, str(tmp_path / "pwned")))
    assert main(["import-edm2", str(pkl), str(dst)]) == 0
    rec = fsio.load_torch(str(dst))  # a plain record: loads with weights_only
    assert rec["precond"]["model_channels"] == 16 and rec["source"].endswith(pkl.name)
    # A self-describing file loads as its own architecture where the config names another (e.g. a guide).
    layout, lineage, _ = open_run(tiny_cfg)
    net = StageContext(tiny_cfg, layout, 0, lineage).models.load(fsio.normalize_uri(str(dst)))
    x, sigma, y = _inputs()
    with torch.no_grad():
        assert torch.equal(net(x, sigma, y), copy.deepcopy(src).half().float()(x, sigma, y))


def test_pretrained_base_replaces_training(tmp_path, tiny_cfg):
    src = _source_net()
    pkl = tmp_path / "edm2-img8-s-2147483-0.130.pkl"
    pkl.write_bytes(edm2_pickle(src, INIT_KWARGS, str(tmp_path / "pwned")))
    cfg = tiny_cfg.model_copy(deep=True)
    cfg.network.num_blocks, cfg.network.attn_resolutions = 1, [4]
    cfg.pretrained.base = str(pkl)
    layout, lineage, _ = open_run(cfg)
    ctx = StageContext(cfg, layout, 0, lineage)
    result = run_stage(ctx, "import-base")  # the plan's step for iteration 0's base (tests/test_import_base.py)
    assert result["pretrained"] == str(pkl) and result["images"] == 2147483000
    assert not fsio.exists(layout.checkpoints(0, "train-base")) or not fsio.listdir(layout.checkpoints(0, "train-base"))
    base = ctx.models.load(layout.model(0, "train-base"))  # the config's network with the imported weights
    x, sigma, y = _inputs()
    with torch.no_grad():
        assert torch.equal(base(x, sigma, y), copy.deepcopy(src).half().float()(x, sigma, y))
    tags = lineage.client.get_run(fsio.read_json(layout.done_marker(0, "train-base"))["mlflow_run_id"]).data.tags
    assert tags["sims.input.pretrained"] == str(pkl)  # the lineage names the source

    cfg.network.model_channels = 32  # a config whose network is not the checkpoint's: clear error
    ctx = StageContext(cfg, layout, 0, lineage)
    with pytest.raises(ConfigError, match=r"pretrained.base: .* model_channels: checkpoint 16, config 32"):
        run_stage(ctx, "import-base", force=True)


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    plain = tmp_path / "network-snapshot-0000000.pkl"
    plain.write_bytes(pickle.dumps({"ema": Evil()}))
    with pytest.raises(UnsafePickleError, match=r"network-snapshot-0000000\.pkl: refused to load: it needs "
                                                r"'posix\.system'"):
        load_edm2(str(plain))

    # The persistence layout with a class EDM2 networks are not made of.
    odd = tmp_path / "odd.pkl"
    odd.write_bytes(edm2_pickle(_source_net(), INIT_KWARGS, str(marker), class_name="Backdoor"))
    with pytest.raises(UnsafePickleError, match=r"odd\.pkl: refused to load: persistent class 'Backdoor'"):
        load_edm2(str(odd))

    # Code hidden inside a tensor's storage bytes (what torch.storage._load_from_bytes would torch.load).
    buf = io.BytesIO()
    torch.save(Evil(), buf)
    nested = tmp_path / "nested.pkl"
    nested.write_bytes(pickle.dumps(_StorageBytes(buf.getvalue()), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"nested\.pkl"):
        read_pickle(nested.read_bytes(), str(nested))
    assert not marker.exists()


class _StorageBytes:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self):
        return (torch.storage._load_from_bytes, (self.data,))


# ----------------------------------------------------------------------------
# The space a checkpoint was trained in travels with it


LATENT_KWARGS = dict(INIT_KWARGS, img_channels=4)


def _latent_pickle(tmp_path, **raw) -> str:
    torch.manual_seed(2)
    kw = {k: v for k, v in LATENT_KWARGS.items() if k != "use_fp16"}
    path = tmp_path / "edm2-img64-xs-2147483-0.135.pkl"
    path.write_bytes(edm2_pickle(Precond(**kw), LATENT_KWARGS, str(tmp_path / "pwned"), **raw))
    return str(path)


def test_a_latent_checkpoint_runs_only_with_the_latents_it_was_trained_on(tmp_path):
    from sims_platform.config.schema import EncoderConfig
    from sims_platform.models.pretrained import check_encoder, import_edm2, read_network

    src = _latent_pickle(tmp_path)
    net = read_edm2(src)
    assert net.encoder is not None and net.encoder["kind"] == "latent"
    edm2_latents = EncoderConfig(kind="latent", vae="s3://b/vae", vae_sha256="0" * 64)  # EDM2's constants
    check_encoder(net, edm2_latents, "pretrained.base")
    other = edm2_latents.model_copy(update={"latent_std": [1.0, 1.0, 1.0, 1.0]})
    with pytest.raises(ValueError, match=r"pretrained.base: .* normalised with raw mean \[5.81, 3.25, 0.12, -2.15\] "
                                         r"and std \[4.17, 4.62, 3.71, 3.28\]"):
        check_encoder(net, other, "pretrained.base")
    with pytest.raises(ValueError, match="trained in latent space, the config's encoder.kind is pixel"):
        check_encoder(net, EncoderConfig(kind="pixel"), "pretrained.base")
    # `sims import-edm2` keeps it, so the platform record is checked the same way
    import_edm2(src, str(tmp_path / "xs.pt"))
    rec = read_network(str(tmp_path / "xs.pt"))
    assert rec.encoder == net.encoder
    with pytest.raises(ValueError, match="encoder"):
        check_encoder(rec, other, "encoder")


def test_a_checkpoint_of_other_latent_statistics_names_them(tmp_path):
    from sims_platform.config.schema import EncoderConfig
    from sims_platform.models.pretrained import encoder_mismatch

    net = read_edm2(_latent_pickle(tmp_path, raw_mean=[1.0, 2.0, 3.0, 4.0], raw_std=[2.0, 2.0, 2.0, 2.0]))
    cfg = EncoderConfig(kind="latent", vae_config={}, latent_mean=[1.0, 2.0, 3.0, 4.0], latent_std=[2.0] * 4)
    assert encoder_mismatch(net.encoder, cfg) is None
    assert "raw mean [1.0, 2.0, 3.0, 4.0]" in encoder_mismatch(net.encoder, EncoderConfig(kind="latent",
                                                                                          vae_config={}))
