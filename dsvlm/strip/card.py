"""The model card (README.md) of a stripped model: recipe, data and metrics of the run."""

from __future__ import annotations

from pathlib import Path

import yaml


def model_card(final: Path, stages: list[dict], params: int) -> str:
    recipe = yaml.safe_load((final / "recipe.yaml").read_text())
    sup = recipe["supervision"]
    model = recipe["model"]
    source = lambda c: c.get("pretrained") or "inline config (random init)"  # noqa: E731
    rows = []
    for info in stages:
        last = info.get("last_metrics", {})
        rec = last.get("rec_loss")
        rows.append(
            f"| {info['stage']} | {info['steps']} | {info['dataset']} ({info['split']}) | "
            f"{'on' if info['supervision'] else 'off'} | {last.get('text_loss', float('nan')):.4f} | "
            f"{'-' if rec is None else f'{rec:.4f}'} | {info['wall_time_s']} |"
        )
    conditions = [f"vision layers {sup['vision_layers']}"] + (["connector output"] if sup["connector"] else [])
    front = {"library_name": "transformers", "pipeline_tag": "image-text-to-text", "tags": ["llava", "dsvlm"]}
    return "\n".join(
        [
            "---",
            yaml.safe_dump(front, sort_keys=False).strip(),
            "---",
            "# LLaVA model trained with dsvlm (diffusion supervision)",
            "",
            "A plain transformers `LlavaForConditionalGeneration`: the diffusion supervision branch used in training "
            "was stripped, so inference costs exactly what the same LLaVA costs.",
            "",
            f"- vision encoder: {source(model['vision'])}",
            f"- language model: {source(model['llm'])}",
            f"- connector: {model['connector']}; chat template: {model['chat_template']}; parameters: {params:,}",
            f"- supervision during training: {'on' if sup['enabled'] else 'off'}; conditions: {', '.join(conditions)}; "
            f"cross-attention: {sup['cross_attention']}; loss: {sup['loss']}; weight: {sup['weight']}",
            "",
            "| stage | steps | data | supervision | final text loss | final rec loss | wall time (s) |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "## Recipe",
            "```yaml",
            yaml.safe_dump(recipe, sort_keys=False).strip(),
            "```",
            "",
        ]
    )
