"""The architecture variants a study can train: one registry, imported everywhere else.

A variant is a name in ``params.yaml`` (``grid.archs``) for a way images enter the decoder
(``base``: ``early``, ``late`` or ``discrete``, model/config.py) and its FFNs: dense, MoE with
learned token-choice routing, or MoE with modality-aware hard routing (paper §2-4, Fig. 11).
The params schema takes its allowed names from :data:`VARIANTS`; training builds a variant's
``ModelConfig`` with :meth:`Variant.config`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.config import Arch, ModelConfig, MoEConfig


@dataclass(frozen=True)
class Variant:
    name: str
    base: Arch  # how images enter: early | late | discrete
    moe: bool = False  # MoE FFNs instead of dense ones
    modality_aware: bool = False  # MoE: image tokens to image experts, text to text experts

    def config(self, base: ModelConfig, moe: MoEConfig | None) -> ModelConfig:
        """``base`` with this variant's arch and FFNs; ``moe`` is required for MoE variants
        (its ``modality_aware`` is set here)."""
        if self.moe and moe is None:
            raise ValueError(f"arch {self.name!r} is MoE: give its MoEConfig")
        moe_cfg = replace(moe, modality_aware=self.modality_aware) if self.moe else None
        return replace(base, arch=self.base, moe=moe_cfg)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("early", "early"),
        Variant("late", "late"),
        Variant("discrete", "discrete"),
        Variant("early-moe", "early", moe=True),
        Variant("early-moe-aware", "early", moe=True, modality_aware=True),
        Variant("late-moe", "late", moe=True),
        Variant("discrete-moe", "discrete", moe=True),
    )
}


def variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(f"unknown arch {name!r}; allowed: {', '.join(VARIANTS)}") from None
