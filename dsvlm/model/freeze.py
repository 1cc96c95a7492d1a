"""The explicit freeze step of a stage: train the named module groups, freeze everything else, say so."""

from __future__ import annotations

from collections.abc import Iterable

from rich.table import Table
from torch import nn

from dsvlm.console import console
from dsvlm.model.dsvlm import DSVLM, encoder_layers
from dsvlm.model.lora import has_llm_lora, lora_parameters
from dsvlm.model.vlm import is_linear_connector

GROUPS = ("vision", "connector", "llm", "supervision")


def _group_parameters(model: DSVLM, group: str) -> list[nn.Parameter]:
    """The parameters a stage that trains `group` updates."""
    vlm = model.vlm
    if group == "vision":
        return reached_vision_parameters(model)
    if group == "connector":
        projector = vlm.model.multi_modal_projector
        if is_linear_connector(vlm):  # linear_2 is the fixed identity of the single linear map
            return list(projector.linear_1.parameters())
        return list(projector.parameters())
    if group == "llm":
        if has_llm_lora(vlm):  # LoRA stage: the adapters only; base weights, embeddings and lm_head stay frozen
            return lora_parameters(vlm.model.language_model)
        return [*vlm.model.language_model.parameters(), *vlm.lm_head.parameters()]
    if group == "supervision":
        branch = model.supervision
        if branch is None:
            raise ValueError("the stage trains `supervision` but the model has no diffusion branch")
        unet = [] if branch.config.freeze_unet else list(branch.unet.parameters())
        return [*branch.new_parameters(), *unet]
    raise ValueError(f"unknown module group {group!r}; choose from {', '.join(GROUPS)}")


def reached_vision_parameters(model: DSVLM) -> list[nn.Parameter]:
    """The vision tower's parameters that some loss reaches: the encoder up to the deepest hidden state that the
    connector or the branch reads. The deeper layers and the pooling tail (CLIP's post_layernorm, SigLIP's head)
    never get a gradient; left trainable, they would have no optimizer state, which an FSDP resume refuses."""
    tower = model.vlm.model.vision_tower
    layers = encoder_layers(tower)
    feature = model.vlm.config.vision_feature_layer
    # hidden_states[k] (len(layers) + 1 of them, the embeddings first) is the output of encoder layer k.
    read = [k % (len(layers) + 1) for k in (feature if isinstance(feature, list) else [feature])]
    if model.supervision is not None:
        read += model.supervision.config.vision_layers
    tail = [module for name, module in tower.named_modules() if name.split(".")[-1] in ("post_layernorm", "head")]
    unreached = {id(p) for module in [*layers[max(read) :], *tail] for p in module.parameters()}
    return [p for p in tower.parameters() if id(p) not in unreached]


def _count(params: Iterable[nn.Parameter]) -> tuple[int, int]:
    unique = {id(p): p for p in params}.values()
    return sum(p.numel() for p in unique if p.requires_grad), sum(p.numel() for p in unique if not p.requires_grad)


def freeze_for_stage(model: DSVLM, train: list[str]) -> list[dict]:
    """Set requires_grad for a stage: only the `train` groups learn; the VAE (and a frozen UNet) never do.

    Logs a table (group, trainable, frozen parameters) to stderr and returns its rows.
    """
    unknown = [g for g in train if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown module group(s) {unknown}; choose from {', '.join(GROUPS)}")
    model.requires_grad_(False)
    for group in train:
        for param in _group_parameters(model, group):
            param.requires_grad_(True)

    vlm = model.vlm
    sections: list[tuple[str, list[nn.Parameter]]] = [
        ("vision", list(vlm.model.vision_tower.parameters())),
        ("connector", list(vlm.model.multi_modal_projector.parameters())),
        ("llm", [*vlm.model.language_model.parameters(), *vlm.lm_head.parameters()]),
    ]
    branch = model.supervision
    if branch is not None:
        new = branch.new_parameters()
        new_ids = {id(p) for p in new}
        sections += [
            ("supervision (adapters, new K/V, routers, LoRA)", new),
            ("unet", [p for p in branch.unet.parameters() if id(p) not in new_ids]),
        ]
        if branch.vae is not None:
            sections.append(("vae", list(branch.vae.parameters())))
        if branch.perceptual is not None:
            sections.append(("perceptual network", list(branch.perceptual.parameters())))
    rows = []
    for name, params in sections:
        trainable, frozen = _count(params)
        rows.append({"module": name, "trainable": trainable, "frozen": frozen})
    _log_table(rows, train)
    return rows


def _log_table(rows: list[dict], train: list[str]) -> None:
    table = Table(title=f"Freeze step: training {', '.join(train)}")
    table.add_column("module")
    table.add_column("trainable", justify="right")
    table.add_column("frozen", justify="right")
    for row in rows:
        table.add_row(row["module"], f"{row['trainable']:,}", f"{row['frozen']:,}")
    table.add_row("total", f"{sum(r['trainable'] for r in rows):,}", f"{sum(r['frozen'] for r in rows):,}")
    console.print(table)
