"""Resume: a training stage killed after a checkpoint continues to the same weights as an uninterrupted run."""

import pytest
import torch

from sims_platform.config.schema import TrainConfig
from sims_platform.models.precond import Precond
from sims_platform.training.checkpoints import list_checkpoints
from sims_platform.training.loop import StopTraining, train


def make_net():
    torch.manual_seed(0)
    return Precond(8, 1, 10, model_channels=8, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[])


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 1, 8, 8, generator=g) * 0.5, torch.randint(10, (64,), generator=g)


CFG = TrainConfig(images=640, batch_size=32, checkpoint_images=160, keep_checkpoints=2, log_images=64)


def _full_and_resumed(build, tmp_path):
    """An uninterrupted run of `build()`'s network, and one stopped after its 320-image checkpoint and resumed."""
    x, y = data()
    full = train(build(), x, y, CFG, seed=1, checkpoints=str(tmp_path / "a"))

    def preempt(images):
        if images == 320:
            raise StopTraining

    with pytest.raises(StopTraining):
        train(build(), x, y, CFG, seed=1, checkpoints=str(tmp_path / "b"), after_checkpoint=preempt)
    assert [i for i, _ in list_checkpoints(str(tmp_path / "b"))] == [160, 320]
    resumed = train(build(), x, y, CFG, seed=1, checkpoints=str(tmp_path / "b"))
    assert resumed.resumed_from.endswith("ckpt-0000000320.pt")
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(a, b)
    return full, resumed


def test_interrupted_training_resumes_to_identical_weights(tmp_path):
    _full_and_resumed(make_net, tmp_path)
    # Only the newest `keep_checkpoints` remain.
    assert [i for i, _ in list_checkpoints(str(tmp_path / "b"))] == [480, 640]


def test_loss_decreases():
    x, y = data()
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        cfg = TrainConfig(images=3200, batch_size=32, checkpoint_images=3200, log_images=640)
        result = train(make_net(), x, y, cfg, seed=0, checkpoints=d)
    assert result.losses[-1][1] < result.losses[0][1]


def test_channels_last_training_resumes_exactly_and_matches_the_default_layout(tmp_path):
    """runtime.channels_last trains the plain engine's network in the channels-last layout: a resumed run
    still reproduces the uninterrupted one bit for bit, and the weights agree with the default layout's to
    float32 rounding accumulated over training."""
    full, _ = _full_and_resumed(lambda: make_net().to(memory_format=torch.channels_last), tmp_path)
    x, y = data()
    default = train(make_net(), x, y, CFG, seed=1, checkpoints=str(tmp_path / "c"))
    for name, a in full.ema.state_dict().items():
        b = default.ema.state_dict()[name]
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), name
