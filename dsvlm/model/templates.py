"""Prompt formats: the stage-2 chat templates and the stage-1 `plain` caption format.

All are Jinja templates for `tokenizer.apply_chat_template`. Message content may be a string (LLaVA data:
`<image>` inline) or a list of `{"type": "image"}` / `{"type": "text", "text": ...}` items (lmms-eval, plain
transformers users); both render the same text. Assistant text and its turn terminator are wrapped in
`{% generation %}` so `return_assistant_tokens_mask=True` yields the training label mask: one template serves
training and evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsvlm.errors import RecipeError

IMAGE_TOKEN = "<image>"

# Renders a message's content. An image item becomes `<image>\n`, which is what LLaVA data holds inline
# ("<image>\nQuestion"), so string and list content of the same turn tokenize identically.
_CONTENT_MACRO = """{%- macro render(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for item in content -%}
{%- if item['type'] == 'image' -%}{{ '<image>\\n' }}
{%- elif item['type'] == 'text' -%}{{ item['text'] }}
{%- endif -%}{%- endfor -%}{%- endif -%}
{%- endmacro -%}
"""


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format and the tokens it relies on."""

    name: str
    jinja: str
    terminator: str
    """Ends every assistant turn; becomes the tokenizer's eos token (generation stops there)."""
    special_tokens: tuple[str, ...]
    """Control tokens of the format (a word-level tokenizer adds them as special tokens)."""
    bos: str | None = None
    """Beginning-of-sequence token a word-level tokenizer should use (None: the format has none)."""


_VICUNA_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# LLaVA-1.5 conv_vicuna_v1: "<s>SYSTEM USER: q ASSISTANT: a</s>USER: q2 ASSISTANT: a2</s>".
_VICUNA = (
    _CONTENT_MACRO
    + """{%- if bos_token -%}{{ bos_token }}{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}{{ render(messages[0]['content']) }}{%- set msgs = messages[1:] -%}
{%- else -%}{{ '"""
    + _VICUNA_SYSTEM.replace("'", "\\'")
    + """' }}{%- set msgs = messages -%}{%- endif -%}{{ ' ' }}
{%- for message in msgs -%}
{%- if message['role'] == 'user' -%}{{ 'USER: ' }}{{ render(message['content']) }}{{ ' ' }}
{%- elif message['role'] == 'assistant' -%}{{ 'ASSISTANT: ' }}
{%- generation -%}{{ render(message['content']) }}{{ '</s>' }}{%- endgeneration -%}
{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"""
)

# Qwen2 chatml. The newline after <|im_end|> is outside the loss, as in Qwen's own fine-tuning.
_CHATML = (
    _CONTENT_MACRO
    + """{%- if messages[0]['role'] != 'system' -%}
{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif -%}
{%- for message in messages -%}
{{ '<|im_start|>' + message['role'] + '\\n' }}
{%- if message['role'] == 'assistant' -%}
{%- generation -%}{{ render(message['content']) }}{{ '<|im_end|>' }}{%- endgeneration -%}{{ '\\n' }}
{%- else -%}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"""
)

_LLAMA3 = (
    _CONTENT_MACRO
    + """{%- if bos_token -%}{{ bos_token }}{%- endif -%}
{%- for message in messages -%}
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
{%- if message['role'] == 'assistant' -%}
{%- generation -%}{{ render(message['content']) }}{{ '<|eot_id|>' }}{%- endgeneration -%}
{%- else -%}{{ render(message['content']) }}{{ '<|eot_id|>' }}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"""
)

# The tiny recipe's format: every control word is one special token of the word-level tokenizer.
_DSVLM = (
    _CONTENT_MACRO
    + """{%- for message in messages -%}
{%- if message['role'] == 'user' -%}{{ '<user> ' }}{{ render(message['content']) }}{{ ' ' }}
{%- elif message['role'] == 'system' -%}{{ '<system> ' }}{{ render(message['content']) }}{{ ' ' }}
{%- elif message['role'] == 'assistant' -%}{{ '<assistant> ' }}
{%- generation -%}{{ render(message['content']) }}{{ ' <end>' }}{%- endgeneration -%}{{ ' ' }}
{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<assistant>' }}{%- endif -%}"""
)

CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna": ChatTemplate("vicuna", _VICUNA, "</s>", ("<s>", "</s>"), bos="<s>"),
    "chatml": ChatTemplate("chatml", _CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": ChatTemplate(
        "llama3",
        _LLAMA3,
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        bos="<|begin_of_text|>",
    ),
    "dsvlm": ChatTemplate("dsvlm", _DSVLM, "<end>", ("<system>", "<user>", "<assistant>", "<end>")),
}

# LLaVA `plain` (stage 1): the image, then the caption, then eos. No system prompt, no roles; the human
# turn contributes only its image. The loss covers the caption and eos (the tokenizer's eos is the chat
# template's terminator, so both stages end turns with the same token).
PLAIN_TEMPLATE = (
    _CONTENT_MACRO
    + """{%- if bos_token -%}{{ bos_token }}{%- endif -%}
{%- for message in messages -%}
{%- if message['role'] == 'user' and '<image>' in render(message['content']) -%}{{ '<image>' }}
{%- elif message['role'] == 'assistant' -%}
{%- generation -%}{{ render(message['content']) }}{{ eos_token }}{%- endgeneration -%}
{%- endif -%}{%- endfor -%}"""
)


def chat_template(name: str) -> ChatTemplate:
    """The chat template called `name` (see `CHAT_TEMPLATES`)."""
    try:
        return CHAT_TEMPLATES[name]
    except KeyError:
        raise RecipeError(f"unknown chat template {name!r}; choose one of {', '.join(CHAT_TEMPLATES)}") from None
