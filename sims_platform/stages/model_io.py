"""A step's model files: a new network of this config, its model record written, any network file read back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sims_platform.config.schema import NetworkConfig, PipelineConfig
from sims_platform.models.precond import Precond
from sims_platform.models.presets import architecture, build_network
from sims_platform.models.pretrained import check_encoder, model_record, read_network
from sims_platform.storage import fsio


@dataclass
class ModelIO:
    """Networks of `cfg` on `device`, in the model space `shape` gives ((channels, height, width), from the encoder)."""

    cfg: PipelineConfig
    device: torch.device
    shape: Callable[[], tuple[int, int, int]]

    def build(self, network: NetworkConfig | None = None) -> Precond:
        """A new network of `network` (default: the config's network), in this config's model space."""
        c, h, _ = self.shape()
        torch.manual_seed(self.cfg.seed)  # identical initial weights on every rank and every relaunch
        return build_network(network or self.cfg.network, h, c, self.cfg.data.label_dim).to(self.device)

    def save(self, uri: str, net: Precond, images: int, **meta) -> None:
        """The model record: its weights with its architecture, so `load` builds it whatever the config says."""
        fsio.save_torch(uri, model_record(net, images, **meta))

    def load(self, uri: str) -> Precond:
        """A model record (built with the architecture it records: e.g. a guide smaller than the config's network;
        a record without one, written before records carried it, with the config's), or an EDM2 pickle; float32,
        eval mode."""
        return self.read(uri)[0]

    def read(self, uri: str) -> tuple[Precond, int | None]:
        """load, and how many training images the network saw when its record says (None: unknown)."""
        if not fsio.exists(uri):
            raise FileNotFoundError(f"model not found at {uri}: run the stage that writes it first")
        rec = read_network(uri)
        check_encoder(rec, self.cfg.encoder, "encoder")
        if rec.kwargs is None:
            net = self.build()
        else:  # seeded as build() is: loading leaves the global generator in one state, whatever the record holds
            torch.manual_seed(self.cfg.seed)
            net = rec.build().to(self.device)
        net.load_state_dict(rec.state_dict)
        return net.eval().requires_grad_(False), rec.images

    def sampling(self, uri: str) -> Precond:
        """load for sampling: in the runtime's memory layout (runtime.channels_last)."""
        net = self.load(uri)
        if not self.cfg.runtime.channels_last:
            return net
        # Module.to takes memory_format (its documented signature), which torch's overloads leave out.
        return net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def network_kwargs(self) -> dict:
        """Our Precond's arguments for this config (what a pretrained base must match)."""
        c, h, _ = self.shape()
        return dict(img_resolution=h, img_channels=c, label_dim=self.cfg.data.label_dim,
                    sigma_data=self.cfg.network.sigma_data, **architecture(self.cfg.network))
