"""Build a plain transformers LLaVA (vision encoder -> connector -> LLM) and its processor from a recipe.

The result is a standard `LlavaForConditionalGeneration` + `LlavaProcessor`: saved with save_pretrained it
loads in any LLaVA consumer (lmms-eval `llava_hf`, vLLM) with no dsvlm code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    SiglipImageProcessor,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from dsvlm.data.geometry import SquareGeometry
from dsvlm.errors import RecipeError
from dsvlm.model.image_tokens import image_token_count
from dsvlm.model.templates import IMAGE_TOKEN, ChatTemplate, chat_template
from dsvlm.model.tokenizer import build_word_tokenizer, prepare_tokenizer
from dsvlm.recipe.schema import ModelConfig

T = TypeVar("T")

_VISION = {
    "clip": (CLIPVisionConfig, CLIPVisionModel, ("clip", "clip_vision_model")),
    "siglip": (SiglipVisionConfig, SiglipVisionModel, ("siglip", "siglip_vision_model")),
}
_LLM_CONFIGS: dict[str, type[PreTrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config}
# Tokens the encoder adds in front of its patch tokens: CLIP's CLS; SigLIP has none.
_EXTRA_TOKENS = {"clip": 1, "siglip": 0}
_DEFAULT_STRATEGY = {"clip": "default", "siglip": "full"}


def build_vlm(
    cfg: ModelConfig, seed: int = 0, words: Iterable[str] | None = None
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A LLaVA model and processor from the recipe's model section; `seed` makes random init deterministic.

    Pretrained vision/LLM weights are used as they are (no copy); the connector is freshly initialised, and so
    are token embeddings added for `<image>` and the template's control tokens. `words`: the vocabulary of
    the word-level tokenizer an inline LLM without a `tokenizer` gets (the training data's words).
    """
    template = chat_template(cfg.chat_template)
    # A private RNG stream: the same seed gives the same weights whatever ran before, and the caller's
    # stream (data order, noise) is left where it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        family, vision = _build_vision(cfg)
        tokenizer = _build_tokenizer(cfg, template, words)
        llm = _build_llm(cfg, tokenizer)
        vlm, processor = _finish(cfg, template, family, vision, tokenizer, llm)
    return vlm, processor


def _finish(
    cfg: ModelConfig,
    template: ChatTemplate,
    family: str,
    vision: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    llm: PreTrainedModel,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Assemble the LLaVA around the encoder and LLM, and its processor."""
    image_size = vision.config.image_size
    patch_size = vision.config.patch_size
    strategy = cfg.vision_feature_select_strategy or _DEFAULT_STRATEGY[family]
    processor = LlavaProcessor(
        image_processor=_image_processor(cfg, family, image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=template.jinja,
        num_additional_image_tokens=_EXTRA_TOKENS[family],
        image_token=IMAGE_TOKEN,
    )
    config = LlavaConfig(
        vision_config=vision.config,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=strategy,
        image_seq_length=image_token_count(processor, image_size, image_size),
        # `linear`: transformers' projector is always linear_1 -> act -> linear_2; with the identity activation
        # and linear_2 fixed to the identity it is exactly one linear map, and stays loadable by plain LLaVA.
        projector_hidden_act="gelu" if cfg.connector == "mlp2x_gelu" else "linear",
        multimodal_projector_bias=True,
        # Not a transformers field: saved in config.json so evaluation squares images as training did.
        image_aspect_ratio=cfg.image_aspect_ratio,
    )
    vlm = _assemble(config, vision, llm, linear_connector=cfg.connector == "linear")
    if len(tokenizer) > vlm.get_input_embeddings().num_embeddings:
        vlm.resize_token_embeddings(len(tokenizer))
    _set_generation_tokens(vlm, tokenizer)
    return vlm, processor


def _build_vision(cfg: ModelConfig) -> tuple[str, PreTrainedModel]:
    """(family, encoder) from the recipe: a pretrained encoder's family is read from its config."""
    vision = cfg.vision
    kwargs = _load_kwargs(cfg, vision.revision)
    if vision.pretrained is not None:
        loaded = _loading(
            "model.vision.pretrained",
            vision.pretrained,
            lambda: AutoConfig.from_pretrained(vision.pretrained, **_config_kwargs(cfg, vision.revision)),
        )
        family = _vision_family(loaded.model_type)
        _, model_cls, _ = _VISION[family]
        encoder = _loading(
            "model.vision.pretrained", vision.pretrained, lambda: model_cls.from_pretrained(vision.pretrained, **kwargs)
        )
        if cfg.image_size is not None and cfg.image_size != encoder.config.image_size:
            raise RecipeError(
                f"model.image_size {cfg.image_size} differs from the pretrained encoder's "
                f"{encoder.config.image_size}; LLaVA feeds the encoder at its own resolution"
            )
        return family, encoder
    config_cls, model_cls, _ = _VISION[vision.type]
    options = dict(vision.config or {})
    if cfg.image_size is not None:
        options["image_size"] = cfg.image_size
    try:
        config = config_cls(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"model.vision.config is not a valid {config_cls.__name__}: {exc}") from exc
    config._attn_implementation = cfg.attn_implementation
    return vision.type, model_cls(config)


def _vision_family(model_type: str) -> str:
    for family, (_, _, types) in _VISION.items():
        if model_type in types:
            return family
    raise RecipeError(f"model.vision.pretrained is a {model_type!r} model; dsvlm supports CLIP and SigLIP encoders")


def _build_tokenizer(cfg: ModelConfig, template: ChatTemplate, words: Iterable[str] | None) -> PreTrainedTokenizerBase:
    llm = cfg.llm
    if llm.tokenizer is not None:
        tokenizer = _loading(
            "model.llm.tokenizer",
            llm.tokenizer,
            lambda: AutoTokenizer.from_pretrained(llm.tokenizer, **_config_kwargs(cfg, None)),
        )
    elif llm.pretrained is not None:
        tokenizer = _loading(
            "model.llm.pretrained",
            llm.pretrained,
            lambda: AutoTokenizer.from_pretrained(llm.pretrained, **_config_kwargs(cfg, llm.revision)),
        )
    elif words is not None:
        tokenizer = build_word_tokenizer(template, words)
    else:
        raise RecipeError(
            "model.llm: an inline LLM without `tokenizer` gets a word-level one over the training "
            "data's words, and none were given; set model.llm.tokenizer or model.llm.pretrained"
        )
    prepare_tokenizer(tokenizer, template)
    return tokenizer


def _build_llm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    llm = cfg.llm
    if llm.pretrained is not None:
        return _loading(
            "model.llm.pretrained",
            llm.pretrained,
            lambda: AutoModelForCausalLM.from_pretrained(llm.pretrained, **_load_kwargs(cfg, llm.revision)),
        )
    config_cls = _LLM_CONFIGS[llm.type]
    options: dict[str, Any] = {
        **(llm.config or {}),
        # The vocabulary is the tokenizer's: an inline config's vocab_size would only be a mismatch waiting.
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    try:
        config = config_cls(**options)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"model.llm.config is not a valid {config_cls.__name__}: {exc}") from exc
    return AutoModelForCausalLM.from_config(config, attn_implementation=cfg.attn_implementation)


def _loading(field: str, source: str, load: Callable[[], T]) -> T:
    """A pretrained directory / repo that is missing or of another architecture is a recipe error, not a
    traceback (transformers raises OSError or ValueError, e.g. "Unrecognized configuration class")."""
    try:
        return load()
    except (OSError, ValueError, KeyError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecipeError(f"{field} {source!r} does not load: {reason}") from exc


def _config_kwargs(cfg: ModelConfig, revision: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    return kwargs


def _load_kwargs(cfg: ModelConfig, revision: str | None) -> dict[str, Any]:
    # fp32 master weights: mixed precision is the trainer's business; a bf16 checkpoint must not train in bf16.
    return {**_config_kwargs(cfg, revision), "dtype": torch.float32, "attn_implementation": cfg.attn_implementation}


def _assemble(
    config: LlavaConfig, vision: PreTrainedModel, llm: PreTrainedModel, linear_connector: bool
) -> LlavaForConditionalGeneration:
    """A LLaVA whose encoder and LLM ARE the given modules (no weight copy, no throw-away random init)."""
    with torch.device("meta"):
        vlm = LlavaForConditionalGeneration(config)
    vlm.model.vision_tower = vision
    vlm.model.language_model = getattr(llm, llm.base_model_prefix)
    vlm.lm_head = llm.get_output_embeddings()
    # PyTorch's default Linear init, as the LLaVA reference code gets for its freshly built mm_projector.
    projector = LlavaMultiModalProjector(config)
    if linear_connector:
        with torch.no_grad():
            projector.linear_2.weight.copy_(torch.eye(projector.linear_2.out_features))
            projector.linear_2.bias.zero_()
    vlm.model.multi_modal_projector = projector
    left = [name for name, t in [*vlm.named_parameters(), *vlm.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"LLaVA assembly left tensors uninitialised: {left[:5]}")
    return vlm


def _set_generation_tokens(vlm: LlavaForConditionalGeneration, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation stops at the turn terminator and pads with the pad token."""
    for target in (vlm.generation_config, vlm.config.text_config):
        target.eos_token_id = tokenizer.eos_token_id
        target.pad_token_id = tokenizer.pad_token_id
        if tokenizer.bos_token_id is not None:
            target.bos_token_id = tokenizer.bos_token_id


def _image_processor(cfg: ModelConfig, family: str, image_size: int) -> Any:
    """The encoder's own preprocessing when its directory ships one, else the family default at its size."""
    if cfg.vision.pretrained is not None:
        try:
            return AutoImageProcessor.from_pretrained(cfg.vision.pretrained, **_config_kwargs(cfg, cfg.vision.revision))
        except OSError:
            pass  # a bare encoder checkpoint without preprocessor_config.json
    if family == "clip":
        return CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        )
    return SiglipImageProcessor(size={"height": image_size, "width": image_size})


def image_geometry(cfg: ModelConfig) -> SquareGeometry:
    """The recipe's square geometry with the pad colour of the encoder's image processor (no weights loaded)."""
    family = cfg.vision.type
    if cfg.vision.pretrained is not None:
        loaded = AutoConfig.from_pretrained(cfg.vision.pretrained, **_config_kwargs(cfg, cfg.vision.revision))
        family = _vision_family(loaded.model_type)
    processor = _image_processor(cfg, family, cfg.image_size or 224)
    return SquareGeometry.for_processor(cfg.image_aspect_ratio, processor.image_mean)


def is_linear_connector(vlm: LlavaForConditionalGeneration) -> bool:
    """True when the projector is the single linear map of the `linear` connector (linear_2 stays frozen)."""
    return vlm.config.projector_hidden_act == "linear"
