"""Tokenizers: a word-level one for inline LLMs, and the preparation every tokenizer gets.

An inline (randomly initialised) LLM has no tokenizer of its own. A word-level vocabulary over the
training data's words (the caller passes them; `dsvlm train` passes the synthetic set's) keeps the model tiny
and makes every answer letter one token, so decoding a one-letter answer gives exactly that letter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from dsvlm.model.templates import IMAGE_TOKEN, ChatTemplate

UNK_TOKEN = "[UNK]"
PAD_TOKEN = "<pad>"


def build_word_tokenizer(template: ChatTemplate, words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer (whitespace + punctuation split, `[UNK]`) over `words` and the template's text.

    The template's own fixed words (system prompt, role names) are added so rendering a conversation produces
    no unknown tokens.
    """
    words = list(words)
    specials = [UNK_TOKEN, PAD_TOKEN, IMAGE_TOKEN, *template.special_tokens]
    base = _word_level(specials, words, template)
    vocab_words = set(words) | _template_words(base, template)
    return _word_level(specials, vocab_words, template)


def _word_level(specials: list[str], words: Iterable[str], template: ChatTemplate) -> PreTrainedTokenizerFast:
    pre = Whitespace()
    # Words are stored as the pre-tokenizer would split them ("colour?" -> "colour", "?"): a vocabulary entry
    # that can never come out of pre-tokenization would be dead weight.
    pieces = {piece for word in words for piece, _ in pre.pre_tokenize_str(word)}
    ordered = specials + sorted(pieces - set(specials))
    backend = Tokenizer(WordLevel({token: i for i, token in enumerate(ordered)}, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        pad_token=PAD_TOKEN,
        eos_token=template.terminator,
        bos_token=template.bos,
        extra_special_tokens=[IMAGE_TOKEN, *template.special_tokens],
    )
    tokenizer.chat_template = template.jinja
    return tokenizer


def _template_words(tokenizer: PreTrainedTokenizerFast, template: ChatTemplate) -> set[str]:
    """The words the template itself writes (system prompt, role names), without special tokens."""
    conversation = [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=template.jinja)
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    text = re.sub("|".join(re.escape(s) for s in specials), " ", text)
    return {piece for piece, _ in Whitespace().pre_tokenize_str(text)}


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, template: ChatTemplate) -> None:
    """Make `tokenizer` fit a LLaVA trained with `template` (in place).

    `<image>` becomes one special token; the template's control tokens are added if missing; eos becomes the
    turn terminator (generation stops only there); a pad token is set (unk if there is one, else `<pad>`);
    no automatic BOS/EOS (the template writes them); padding goes right (training); the chat template is
    the conversation format.
    """
    # Registered as added special tokens even when the vocabulary already has them as plain pieces, so text
    # holding "<image>" can never be split into sub-words.
    added = tokenizer.get_added_vocab()
    missing = [t for t in (IMAGE_TOKEN, *template.special_tokens) if t not in added]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    tokenizer.eos_token = template.terminator
    if tokenizer.bos_token is None and template.bos is not None:
        tokenizer.bos_token = template.bos
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    # The template alone writes BOS/EOS: training tokenises rendered text without special tokens, and the
    # processor at inference (lmms-eval) must produce the same ids, not prepend a second BOS.
    # Set even when the flag reads False: a loaded tokenizer.json may still carry a BOS-adding post-processor,
    # and setting the flag rebuilds it.
    for flag in ("add_bos_token", "add_eos_token"):
        if hasattr(tokenizer, flag):
            setattr(tokenizer, flag, False)
    tokenizer.padding_side = "right"
    tokenizer.chat_template = template.jinja
