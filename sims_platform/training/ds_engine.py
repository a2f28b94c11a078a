"""The DeepSpeed engine (ZeRO stages 0-3, fp32/bf16/fp16) behind the training loop's Engine interface.

Two DeepSpeed facts shape it:
- Master weights live in the optimizer (partitioned under ZeRO), so MPConv's in-place weight normalisation
  at forward time would be lost or overwritten. It is turned off, and the master weights are re-normalised
  after every optimizer step through DeepSpeed's full-parameter API (then copied into the module weights).
  The next forward sees unit-norm weights, exactly as EDM2's forced weight normalisation intends.
- ZeRO state is tied to the world size. Besides DeepSpeed's own per-rank files, the loop saves a
  consolidated state (full fp32 weights + Adam moments in torch.optim.Adam's state_dict format, the plain
  engine's format) that any engine at any world size loads (`initial`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from sims_platform.config.schema import TrainConfig
from sims_platform.models.mp_layers import MPConv, normalize
from sims_platform.training import distributed
from sims_platform.training.batches import BatchPlan
from sims_platform.training.engines import new_adam

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
TAG = "state"  # DeepSpeed's checkpoint tag: one checkpoint per folder, so a fixed name


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: TrainConfig, plan: BatchPlan) -> dict[str, Any]:
    d = cfg.distributed
    conf = {
        "train_batch_size": plan.micro_batch * plan.accumulation * plan.world_size,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "zero_optimization": {"stage": d.zero_stage},
        "bf16": {"enabled": d.precision == "bf16"},
        "fp16": {"enabled": d.precision == "fp16"},
        "gradient_clipping": d.grad_clip or 0.0,
        "zero_allow_untested_optimizer": True,  # the client optimizer is torch.optim.Adam (runs on CPU too)
        "steps_per_print": 2**62,  # the loop logs (rank 0, MLflow)
        "wall_clock_breakdown": False,
    }
    return _merge(conf, d.deepspeed)


class DeepSpeedEngine:
    kind = "deepspeed"

    def __init__(self, net: nn.Module, cfg: TrainConfig, plan: BatchPlan, device: torch.device,
                 initial: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None):
        import deepspeed

        self.zero = cfg.distributed.zero_stage
        self.world = plan.world_size
        self.plan = plan
        self.names = [n for n, _ in net.named_parameters()]
        self.shapes = {n: p.shape for n, p in net.named_parameters()}
        self.buffer_names = [n for n, _ in net.named_buffers()]
        self.keys = list(net.state_dict().keys())
        for m in net.modules():
            if isinstance(m, MPConv):
                m.inplace_normalize = False
        if initial is not None:  # weights go in before DeepSpeed copies them into its (partitioned) masters
            net.load_state_dict(initial[0])
        for p in net.parameters():
            # DeepSpeed broadcasts parameters as bytes (p.data.view(torch.uint8)), which fails on 0-dim
            # tensors (EDM2's scalar gains): the engine holds them as shape [1]; outputs restore the shapes.
            if p.dim() == 0:
                p.data = p.data.reshape(1)
        net.to(device)
        self.client_opt = new_adam(net, cfg)
        self.group_template = self.client_opt.state_dict()["param_groups"]
        distributed.init(distributed.detect(), need_group=True)
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False, dist_init_required=False)
        self.engine, _, _, _ = deepspeed.initialize(model=net, optimizer=self.client_opt,
                                                    config=ds_config(cfg, plan), dist_init_required=False)
        self.forward = self.engine
        self.net = self.engine.module
        self.convs = [m.weight for m in self.net.modules() if isinstance(m, MPConv)]
        if initial is not None:
            self._load_optimizer(initial[1])
        self.post_step()

    # -- a step -----------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()  # DeepSpeed's bf16/fp16 modes cast the module itself

    def set_lr(self, lr: float) -> None:
        # ZeRO wraps the client optimizer but steps it with these same param_group dicts.
        for g in self.client_opt.param_groups:
            g["lr"] = lr

    def lr(self) -> float:
        return self.client_opt.param_groups[0]["lr"]

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loss is (sum)/(global batch), so undo the average.
        self.engine.backward(loss * self.world, scale_wrt_gas=False)
        self.engine.step()  # a no-op except at the accumulation boundary (DeepSpeed counts micro-steps)

    def step(self) -> None:
        pass  # the boundary micro-step above stepped the optimizer

    def full_params(self) -> list[torch.Tensor]:
        """Every parameter as a full fp32 tensor, on every rank (collective under ZeRO)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = []
        for name, p in self.net.named_parameters():
            hp = safe_get_full_fp32_param(p)  # None: ZeRO-0 fp32, where p is the master weight
            out.append((p.detach() if hp is None else hp.detach()).float().reshape(self.shapes[name]))
        return out

    @torch.no_grad()
    def post_step(self) -> None:
        """EDM2's forced weight normalisation, applied to the master weights (collective)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        with deepspeed.zero.GatheredParameters(self.convs, modifier_rank=0, enabled=self.zero == 3):
            for p in self.convs:
                hp = safe_get_full_fp32_param(p)
                w = normalize((p.detach() if hp is None else hp).float().reshape(p.shape))
                if hp is not None:
                    safe_set_full_fp32_param(p, w)
                p.data.copy_(w.to(p.dtype))  # the module copy the next forward uses

    # -- state --------------------------------------------------------------------
    def consolidated_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Full fp32 weights and Adam state as the plain engine saves them (collective; same on all ranks)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        params, buffers = dict(self.net.named_parameters()), dict(self.net.named_buffers())
        weights: dict[str, torch.Tensor] = {}
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, name in enumerate(self.names):
            p = params[name]
            hp = safe_get_full_fp32_param(p)
            if hp is None:  # ZeRO-0 fp32: the client Adam holds per-parameter state
                weights[name] = p.detach().float().cpu().reshape(self.shapes[name]).clone()
                st = self.client_opt.state.get(p, {})
                m, v = st.get("exp_avg"), st.get("exp_avg_sq")
            else:
                weights[name] = hp.detach().float().cpu().reshape(self.shapes[name]).clone()
                m = safe_get_full_optimizer_state(p, "exp_avg")
                v = safe_get_full_optimizer_state(p, "exp_avg_sq")
            if m is not None and v is not None:
                state[i] = {"step": torch.tensor(float(step)),
                            "exp_avg": m.detach().float().cpu().reshape(self.shapes[name]).clone(),
                            "exp_avg_sq": v.detach().float().cpu().reshape(self.shapes[name]).clone()}
        for name in self.buffer_names:
            weights[name] = buffers[name].detach().cpu().clone()
        groups = [dict(g, lr=self.lr()) for g in self.group_template]
        return {k: weights[k] for k in self.keys}, {"state": state, "param_groups": groups}

    def load_consolidated(self, net_state: dict[str, torch.Tensor], opt_state: dict[str, Any]) -> None:
        raise RuntimeError("a DeepSpeed engine takes a consolidated state at construction (initial=...)")

    def _load_optimizer(self, opt_state: dict[str, Any]) -> None:
        """Adam moments and step count from a consolidated state (collective).

        ZeRO creates optimizer state lazily at the first step, so one zero-gradient step is taken first:
        Adam's update is exactly 0 when both moments are 0, so the weights do not move.
        """
        from deepspeed.utils import safe_set_full_optimizer_state

        state = opt_state.get("state", {})
        if not state:
            return
        self.set_lr(0.0)
        self._zero_gradient_step()
        params = dict(self.net.named_parameters())
        if self.zero == 0 and not (self.engine.bfloat16_enabled() or self.engine.fp16_enabled()):
            for i, name in enumerate(self.names):  # the client Adam owns per-parameter state here
                if i in state:
                    p = params[name]
                    self.client_opt.state[p] = {k: v.clone() if k == "step" else v.to(p.device).reshape(p.shape)
                                                for k, v in state[i].items()}
        else:
            device = next(iter(params.values())).device
            for i, name in enumerate(self.names):
                if i in state:
                    for key in ("exp_avg", "exp_avg_sq"):
                        safe_set_full_optimizer_state(params[name], state[i][key].to(device), key)
            step = next(iter(state.values()))["step"]
            for st in self.client_opt.state.values():  # ZeRO's flat partitions share one step count
                st["step"] = step.clone() if torch.is_tensor(step) else torch.tensor(float(step))

    def _zero_gradient_step(self) -> None:
        net = self.net
        dev = next(net.parameters()).device
        x = torch.zeros(1, net.img_channels, net.img_resolution, net.img_resolution, device=dev)
        y = torch.zeros(1, net.label_dim, device=dev) if net.label_dim else None
        for _ in range(self.plan.accumulation):
            out, logvar = self.engine(x, torch.ones(1, device=dev), y, return_logvar=True)
            self.engine.backward((out.sum() + logvar.sum()) * 0.0, scale_wrt_gas=False)
            self.engine.step()

    def save_native(self, local_dir: str) -> None:
        """DeepSpeed's own checkpoint (per-rank files) into local_dir; every rank must call it."""
        self.engine.save_checkpoint(local_dir, tag=TAG, save_latest=False)

    def load_native(self, local_dir: str) -> None:
        path, _ = self.engine.load_checkpoint(local_dir, tag=TAG, load_module_strict=True,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {local_dir}/{TAG}")
