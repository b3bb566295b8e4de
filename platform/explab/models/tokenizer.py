"""A byte-level tokenizer built in code (no files): every string round-trips exactly.

Ids 0..255 are the raw bytes (as GPT-2's printable byte symbols) with no merges, so tokenization is
context-free: ``encode(a + b) == encode(a) + encode(b)``. Special tokens follow the bytes.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
IMAGE_TOKEN = "<image>"

# Each turn: <|role|>\n{content}<|end|>\n ; the generation prompt opens an assistant turn.
# Content is a string or a list of parts ({"type": "text", "text": ...} / {"type": "image"}); an image
# part becomes the family's image placeholder, which its processor expands to the image tokens.


def chat_template(image_placeholder: str = IMAGE_TOKEN) -> str:
    """The chat template, with ``image_placeholder`` for each image part."""
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{{ '" + image_placeholder + "' }}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '<|end|>\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )


CHAT_TEMPLATE = chat_template()


def byte_tokenizer(
    extra_special: tuple[str, ...] = (),
    named_special: dict[str, str] | None = None,
    image_placeholder: str = IMAGE_TOKEN,
) -> PreTrainedTokenizerFast:
    """The byte tokenizer; ``extra_special`` adds tokens such as ``<image>`` after the defaults.

    ``named_special`` adds tokens that the tokenizer also exposes as attributes (``{"video_token":
    "<video>"}`` gives ``tok.video_token`` and ``tok.video_token_id``), as some processors expect.
    ``image_placeholder`` is what the chat template writes for an image part.
    """
    named = dict(named_special or {})
    extra_special = (*extra_special, *(t for t in named.values() if t not in extra_special))
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, PAD, *ROLE_TOKENS, *extra_special]
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=named or list(ROLE_TOKENS + extra_special),
        chat_template=chat_template(image_placeholder),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (what the ByteLevel pre-tokenizer emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
