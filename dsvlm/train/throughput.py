"""Training throughput as users compare it: tokens/s per device and model FLOPs utilisation (MFU).

Model FLOPs per optimizer step count the encoder and the LLM with the usual 2 FLOPs per parameter per token per
pass (PaLM's MFU, without attention's sequence-length term and without activation-checkpointing recomputation):
forward 2·N, the backward's activation gradients 2·N when a gradient flows through the tower, weight gradients 2
per trained parameter. So a trained tower costs 6·N per token, a frozen LLM that the connector's gradient crosses
4·N, one trained through LoRA adapters 4·N + 2·N_lora, a frozen encoder (forward only) 2·N. The LLM sees every
attended token (text and image tokens), the encoder `positions` tokens per image. The diffusion branch
(convolutions: no per-token formula) is measured once with torch's FLOP counter on a forward and reported apart
(`branch_tflops`), with the same backward rule; MFU counts encoder + LLM only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from dsvlm.model.dsvlm import DSVLM
from dsvlm.model.freeze import reached_vision_parameters

# Dense bf16/fp16 tensor-core peak per device, TFLOP/s (vendor datasheets, SXM parts, no sparsity), keyed by a
# substring of torch.cuda.get_device_name(). Other devices and fp32 stages need `run.peak_tflops`.
PEAK_HALF_PRECISION_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}


def peak_tflops(configured: float | None, precision: str, device: torch.device) -> float | None:
    """The peak of one device: the recipe's `run.peak_tflops`, else the table for a known GPU in bf16/fp16."""
    if configured is not None:
        return configured
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_HALF_PRECISION_TFLOPS.items() if key in name), None)


def _flops_per_token(params: list[torch.nn.Parameter], crossed: bool) -> int:
    """FLOPs per token of one tower: forward 2 per parameter; activation gradients 2 per parameter when a gradient
    flows through it (from a trained part before it, `crossed`, or inside it: LoRA adapters); weight gradients 2 per
    trained parameter."""
    total = sum(p.numel() for p in params)
    trained = sum(p.numel() for p in params if p.requires_grad)
    return 2 * total + (2 * total if crossed or trained else 0) + 2 * trained


@dataclass(frozen=True)
class ModelFlops:
    """Encoder + LLM FLOPs of a step from its token and image counts."""

    llm_per_token: int
    vision_per_position: int
    positions: int  # encoder tokens per image

    @classmethod
    def of(cls, model: DSVLM) -> ModelFlops:
        vlm = model.vlm
        llm = list({id(p): p for p in [*vlm.model.language_model.parameters(), *vlm.lm_head.parameters()]}.values())
        vision = reached_vision_parameters(model)
        # The text loss's gradient crosses the LLM when anything before it (connector, encoder) trains.
        upstream = [*vlm.model.multi_modal_projector.parameters(), *vision]
        return cls(
            llm_per_token=_flops_per_token(llm, crossed=any(p.requires_grad for p in upstream)),
            vision_per_position=_flops_per_token(vision, crossed=False),
            positions=vlm.model.vision_tower.embeddings.num_positions,
        )

    def step_flops(self, tokens: float, images: float) -> float:
        return self.llm_per_token * tokens + self.vision_per_position * self.positions * images


class BranchFlops:
    """The diffusion branch's FLOPs per reconstructed image, counted on the first forward that reconstructs."""

    def __init__(self, model: DSVLM) -> None:
        unet = model.supervision.unet.parameters() if model.supervision is not None else []
        # Its backward: activation gradients always (the loss reaches the conditions through it), weights if trained.
        self.backward_factor = 3 if any(p.requires_grad for p in unet) else 2
        self.per_image: float | None = None

    @contextlib.contextmanager
    def measuring(self, reconstructed: int) -> Iterator[None]:
        if self.per_image is not None or reconstructed == 0:
            yield
            return
        with FlopCounterMode(display=False) as counter:
            yield
        # Forward attribution by module is exact; the root's name depends on the wrapper (DDP, FSDP).
        branch = [
            sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.split(".")[-1] == "supervision"
        ]
        self.per_image = (max(branch) if branch else 0.0) * self.backward_factor / reconstructed

    def step_flops(self, reconstructed: float) -> float | None:
        return None if self.per_image is None else self.per_image * reconstructed


def throughput_fields(
    tokens: float,
    images: float,
    reconstructed: float,
    step_time_s: float,
    world: int,
    model: ModelFlops,
    branch: BranchFlops,
    peak: float | None,
) -> dict[str, float | None]:
    """The metric line's throughput: global and per-device tokens/s, TFLOPs of the step, MFU when the peak is known."""
    flops = model.step_flops(tokens, images)
    branch_flops = branch.step_flops(reconstructed)
    return {
        "tokens_per_s": round(tokens / step_time_s, 1),
        "tokens_per_s_per_device": round(tokens / step_time_s / world, 1),
        "model_tflops": _significant(flops / 1e12),
        "branch_tflops": None if branch_flops is None else _significant(branch_flops / 1e12),
        "mfu": None if peak is None else _significant(flops / step_time_s / (peak * 1e12 * world)),
    }


def _significant(value: float, digits: int = 4) -> float:
    return float(f"{value:.{digits}g}")
