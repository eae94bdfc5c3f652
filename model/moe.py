"""Mixture-of-experts SwiGLU FFN: token-choice top-k routing, dropless (paper §4, Fig. 11).

Layout follows torchtitan's MoE: the E experts' weights are stacked into 3-D parameters, the
(token, expert) assignments are sorted by expert id, every expert runs in ONE grouped matmul,
and the gated outputs are summed back into token order with ``index_add_``. No Python loop over
experts runs here; the per-expert loop lives in ``tests/model/test_moe.py`` as the oracle.

Two interchangeable kernels run the experts:

* ``grouped_mm``: ``torch._grouped_mm(x_sorted, w, offs=cumsum(counts))``. It has a CPU kernel
  with autograd in torch 2.13, but only for fp32/bf16/fp16, with row strides that are multiples
  of 16 bytes (``dim`` and ``hidden`` multiples of 4 in fp32, of 8 in bf16) and at least one
  token. No host sync (the offsets stay on the device).
* ``bmm``: each expert's tokens padded to the largest count, ``(E, C, dim) @ (E, dim, hidden)``.
  Works for any dtype/shape; costs padding FLOPs and one host sync (``counts.max()``).

``impl="auto"`` (the default) takes ``grouped_mm`` when a one-off probe (forward + backward,
checked against ``mm``) passes for the device and dtype and the shapes are aligned, else ``bmm``.
Why, measured by ``bench/moe_speed.py`` (2-core CPU, 1 thread, B=16 L=256, 8 experts top-1,
fwd+bwd, ms/step median; the box was shared, so +-15%)::

    dim  dense  grouped_mm  bmm   per-expert loop
     64     32          33   48                33
    128     92          95  111               121
    256    343         366  456               396

grouped_mm is within ~7% of the dense SwiGLU with the same active parameters; bmm is 20-50%
slower (zero-fill, scatter and gather of the padded batch, plus up to max/mean-load padding
FLOPs). On CPU ``_grouped_mm`` is itself one ``mm`` per group inside ATen (the profiler shows
E ``aten::mm`` per call), so it matches the Python loop there; on CUDA (sm90, bf16) it is a
grouped GEMM kernel (not measured here).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from model.config import MoEConfig

Impl = Literal["auto", "grouped_mm", "bmm"]
IMPLS: tuple[str, ...] = ("auto", "grouped_mm", "bmm")


@torch.compiler.assume_constant_result  # a probe, not a graph op: torch.compile keeps its value
@functools.cache
def grouped_mm_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward AND backward correctly on this device/dtype.

    Probed once per (device, dtype) on a tiny problem with an empty group, against ``mm``.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    # with gradients whatever the caller's mode (a first call under no_grad would otherwise
    # fail the probe), and its own saved-tensor hooks: probed inside a block under activation
    # checkpointing, its tensors must not count as the block's (the recomputation finds the
    # answer cached)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return _probe_grouped_mm(device_type, dtype)


def _probe_grouped_mm(device_type: str, dtype: torch.dtype) -> bool:
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(12, 16, generator=g).to(device_type, dtype).requires_grad_()
        w = torch.randn(3, 16, 8, generator=g).to(device_type, dtype).requires_grad_()
        counts = [5, 0, 7]
        offs = torch.tensor(counts, device=device_type).cumsum(0).to(torch.int32)
        dy = torch.randn(12, 8, generator=g).to(device_type, dtype)
        y = torch._grouped_mm(x, w, offs=offs)
        dx, dw = torch.autograd.grad(y, (x, w), dy)
        ref = torch.cat([xe @ w[e] for e, xe in enumerate(x.split(counts))])
        rdx, rdw = torch.autograd.grad(ref, (x, w), dy)
        tol = dict(rtol=2e-2, atol=2e-2)  # loose: bf16/fp16 too, this guards against garbage
        return all(torch.allclose(a, b, **tol) for a, b in ((y, ref), (dx, rdx), (dw, rdw)))
    except (RuntimeError, NotImplementedError, TypeError):
        return False


def _all_sum(x: Tensor) -> Tensor:
    """``x`` summed over the processes training this model together (torchrun; in place), or
    ``x`` itself without a process group."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def _grouped_mm_ok(x: Tensor, dim: int, hidden: int) -> bool:
    """``_grouped_mm`` usable for this call: kernel works, strides 16-byte aligned, >= 1 row."""
    align = 16 // x.element_size() if 16 % x.element_size() == 0 else 0
    return (
        align > 0
        and dim % align == 0
        and hidden % align == 0
        and x.shape[0] > 0
        and grouped_mm_works(x.device.type, x.dtype)
    )


class MoEFFN(nn.Module):
    """E SwiGLU experts, token-choice top-k, dropless. Drop-in for ``SwiGLU`` plus an aux dict.

    Parameters (stacked, expert-major): ``w1``, ``w3``: (E, dim, hidden); ``w2``: (E, hidden,
    dim); expert e computes ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` = ``SwiGLU`` with
    ``w1.weight = w1[e].T``. Each expert is initialised exactly as a dense ``SwiGLU``'s
    ``nn.Linear`` (uniform +-1/sqrt(fan_in)), so MoE and dense start from the same scale;
    a model-wide init may overwrite this (``reset_parameters`` restores it).

    Routing (Switch / ST-MoE): fp32 softmax over the router logits, top-k experts per token;
    the gate is the chosen prob for k=1 (so the router gets gradient) and the top-k probs
    renormalised to sum to 1 for k>1. With ``cfg.modality_aware`` the first
    ``cfg.n_image_experts`` experts take only image tokens and the rest only text tokens (logits
    outside the token's group are -inf before softmax and top-k).
    """

    def __init__(self, dim: int, hidden: int, cfg: MoEConfig, impl: Impl = "auto"):
        super().__init__()
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} must be one of {IMPLS}")
        self.dim, self.hidden, self.cfg, self.impl = dim, hidden, cfg, impl
        E = cfg.n_experts
        self.router = nn.Linear(dim, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, dim, hidden))
        self.w3 = nn.Parameter(torch.empty(E, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(E, hidden, dim))
        # (E,) True for image experts; a buffer so it follows .to(device)
        is_img_expert = torch.arange(E) < (cfg.n_image_experts if cfg.modality_aware else 0)
        self.register_buffer("expert_is_image", is_img_expert, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        for w, fan_in in ((self.w1, self.dim), (self.w3, self.dim), (self.w2, self.hidden)):
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
        self.router.reset_parameters()

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"dim={self.dim}, hidden={self.hidden}, n_experts={c.n_experts}, top_k={c.top_k}, "
            f"modality_aware={c.modality_aware}, impl={self.impl}"
        )

    # --- routing -------------------------------------------------------------------------
    def route(self, x: Tensor, is_image: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x: (N, dim), is_image: (N,) -> logits (N, E), probs (N, E), gate (N, k), ids (N, k).

        logits/probs are fp32 (or x's dtype if wider); logits outside a token's group are -inf.
        """
        logits = self.router(x)  # (N, E)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if self.cfg.modality_aware:
            allowed = self.expert_is_image[None, :] == is_image[:, None]  # (N, E)
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(dim=-1)  # (N, E)
        gate, idx = probs.topk(self.cfg.top_k, dim=-1)  # (N, k)
        if self.cfg.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return logits, probs, gate, idx

    def routing_stats(
        self, logits: Tensor, probs: Tensor, idx: Tensor, counts: Tensor, is_image: Tensor
    ) -> dict[str, Tensor]:
        """Losses and per-expert fractions for one layer; see ``forward`` for the keys.

        Load balancing (Switch Transformer eq. 4; ST-MoE z-loss eq. 5). A *group* is the set of
        experts a token may use: all E experts, or (modality-aware) the image or the text
        experts. For group g with N_g tokens and E_g experts, loss_g = E_g * sum_{e in g} f_e P_e
        with f_e = assignments to e / (N_g k) and P_e = mean prob of e over g's tokens; the
        layer's loss is the token-weighted mean sum_g (N_g / N) loss_g: 1 at a uniform router.

        Over several processes (torchrun; each holds some rows of the global batch) the token
        and assignment counts are summed over the ranks and each rank's terms are taken over
        these GLOBAL counts, so the ranks' losses sum to the global batch's loss and their
        gradients to its gradient (flows/training/step.py scales by the number of ranks what DDP
        averages); ``lb_loss`` and ``z_loss`` are then this rank's shares. In one process the
        sum is the counts themselves.
        """
        cfg, E, k = self.cfg, self.cfg.n_experts, self.cfg.top_k
        fdt = probs.dtype
        img_w = is_image.to(fdt)[:, None].expand(-1, k).flatten()
        img_counts = torch.bincount(idx.flatten(), weights=img_w, minlength=E).to(fdt)  # (E,)
        sizes = torch.stack([probs.new_tensor(float(probs.shape[0])), is_image.sum().to(fdt)])
        total = _all_sum(torch.cat([counts.to(fdt), img_counts, sizes]).detach())
        counts_g, img_g, N, n_img = total[:E], total[E : 2 * E], total[2 * E], total[2 * E + 1]
        n_txt = N - n_img
        if cfg.modality_aware:
            n_group = torch.where(self.expert_is_image, n_img, n_txt)  # (E,) N_g of e's group
            n_img_exp = cfg.n_image_experts
            e_group = torch.where(self.expert_is_image, n_img_exp, E - n_img_exp).to(fdt)
        else:
            n_group = N.expand(E)
            e_group = torch.full((E,), float(E), dtype=fdt, device=probs.device)
        f = counts_g / (n_group.clamp(min=1) * k)  # (E,)
        P = probs.sum(dim=0) / n_group.clamp(min=1)  # (E,) this rank's tokens, the global count
        lb_loss = (n_group / N.clamp(min=1) * e_group * f * P).sum()
        # z-loss over the logits the router actually uses (masked to the group: -inf adds 0)
        z_loss = logits.logsumexp(dim=-1).square().sum() / N.clamp(min=1)
        return {
            "aux_loss": cfg.aux_loss_weight * lb_loss + cfg.z_loss_weight * z_loss,
            "lb_loss": lb_loss.detach(),
            "z_loss": z_loss.detach(),
            "load": counts_g / (N * k).clamp(min=1),
            "image_frac": img_g / (n_img * k).clamp(min=1),
            "text_frac": (counts_g - img_g) / (n_txt * k).clamp(min=1),
        }

    # --- experts -------------------------------------------------------------------------
    def _experts_grouped_mm(self, xs: Tensor, counts: Tensor) -> Tensor:
        """xs: (M, dim) sorted by expert, counts: (E,) -> (M, dim), in xs's dtype.

        Autocast does not cover ``_grouped_mm``: the caller casts xs to the autocast dtype and the
        weights follow here, as autocast does for ``mm`` (without this the experts ran in fp32
        under bf16 autocast, and torch.compile refused fp32 inputs on CUDA).
        """
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end row of each expert's group
        w1, w3, w2 = (w.to(xs.dtype) for w in (self.w1, self.w3, self.w2))
        h = F.silu(torch._grouped_mm(xs, w1, offs=offs)) * torch._grouped_mm(xs, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs)

    def _experts_bmm(self, xs: Tensor, counts: Tensor, expert: Tensor) -> Tensor:
        """Pad each expert's rows to the busiest expert's count C, run (E, C, .) bmm's."""
        E, M = counts.shape[0], xs.shape[0]
        C = int(counts.max()) if M else 0  # host sync
        start = counts.cumsum(0) - counts  # (E,) first sorted row of each expert
        slot = expert * C + torch.arange(M, device=xs.device) - start[expert]  # (M,) padded row
        xp = xs.new_zeros(E * C, self.dim).index_copy(0, slot, xs).view(E, C, self.dim)
        h = F.silu(torch.bmm(xp, self.w1)) * torch.bmm(xp, self.w3)  # (E, C, hidden)
        return torch.bmm(h, self.w2).view(E * C, self.dim)[slot]  # (M, dim); pad rows are 0

    def forward(
        self, x: Tensor, is_image: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """x: (B, L, dim) or (N, dim); is_image: bool of x's leading shape (None = all text).

        Returns y (x's shape) and the aux dict: ``aux_loss`` (weighted, to add to the loss),
        ``lb_loss`` and ``z_loss`` (unweighted, detached), ``load`` / ``image_frac`` /
        ``text_frac``: (E,) fraction of all / image / text token-assignments per expert.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"x.shape[-1]={x.shape[-1]} != dim={self.dim}")
        lead = x.shape[:-1]
        if is_image is None:
            if self.cfg.modality_aware:
                raise ValueError("modality_aware MoE needs is_image")
            is_image = torch.zeros(lead, dtype=torch.bool, device=x.device)
        elif is_image.shape != lead:
            raise ValueError(f"is_image.shape={tuple(is_image.shape)} != {tuple(lead)}")
        E, k = self.cfg.n_experts, self.cfg.top_k
        xf, is_image = x.reshape(-1, self.dim), is_image.reshape(-1)  # (N, dim), (N,)
        logits, probs, gate, idx = self.route(xf, is_image)

        # dispatch: sort the N*k (token, expert) assignments by expert (stable: token order
        # within an expert), gather the tokens, run all experts, combine with index_add_
        order = idx.flatten().argsort(stable=True)  # (N*k,)
        expert = idx.flatten()[order]  # (N*k,) sorted expert ids
        token = order // k  # (N*k,) token of each sorted assignment
        counts = torch.bincount(expert, minlength=E)  # (E,) tokens per expert
        aux = self.routing_stats(logits, probs, idx, counts, is_image)
        xs = xf[token]  # (N*k, dim)
        if torch.is_autocast_enabled(xs.device.type):  # experts in the autocast dtype (bf16)
            xs = xs.to(torch.get_autocast_dtype(xs.device.type))
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if _grouped_mm_ok(xs, self.dim, self.hidden) else "bmm"
        elif impl == "grouped_mm" and not _grouped_mm_ok(xs, self.dim, self.hidden):
            raise ValueError(
                f"impl='grouped_mm' unsupported here ({xs.device.type}, {xs.dtype}, dim="
                f"{self.dim}, hidden={self.hidden}, {xs.shape[0]} rows); use 'auto' or 'bmm'"
            )
        if impl == "grouped_mm":
            ys = self._experts_grouped_mm(xs, counts)
        else:
            ys = self._experts_bmm(xs, counts, expert)
        ys = ys * gate.flatten()[order, None].to(ys.dtype)  # (N*k, dim)
        # combine in x's dtype (fp32 under autocast: top-k sums and the residual stay fp32)
        y = torch.zeros_like(xf).index_add_(0, token, ys.to(xf.dtype))  # (N, dim)
        return y.view_as(x), aux
