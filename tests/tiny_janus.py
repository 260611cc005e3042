"""Tiny random Janus folders in the Hugging Face format, built locally with transformers (no hub):
a 2-layer Llama with grouped queries, a VQ codebook and grid, a word-level tokenizer with Janus's
special tokens at the ids a `JanusShape` gives, and Janus-Pro's chat template.

Two shapes matter:
- `JANUS_PRO`: deepseek-community/Janus-Pro-1B's ids and sizes (text vocabulary 102400, codebook
  16384, a 24x24 grid at 384 px, `<begin_of_image>` 100016, pad 100015, BOS 100000, context 16384);
  only widths and depths shrink.  Prompt words sit at ids spread over the whole text vocabulary.
- `SMALL`: 64 codes in a 4x4 grid, for the statistical tests that need thousands of images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = ["a", "the", "red", "blue", "green", "dog", "cat", "house", "tree", "under", "rain", "sun", "small", "big"]
SPECIAL_TOKENS = {
    "bos": "<|begin_of_sentence|>", "eos": "<|end_of_sentence|>", "pad": "<|pad|>", "unk": "<unk>",
    "boi": "<begin_of_image>", "eoi": "<end_of_image>", "image": "<image_placeholder>",
    "user": "<|User|>", "assistant": "<|Assistant|>",
}
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|User|>' if message['role'] == 'user' else '<|Assistant|>' }}: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


@dataclass(frozen=True)
class JanusShape:
    """What a Janus folder's ids and sizes are (the facts real checkpoints fix)."""

    text_vocab: int
    codes: int  # vq_config.num_embeddings
    grid: int  # image tokens per row and rows (vq_config.num_patches)
    image_size: int  # pixels; the VQ decoder upsamples the grid by 2 per level past the first
    special_ids: dict[str, int]  # SPECIAL_TOKENS key -> id
    max_position_embeddings: int = 256
    spread_words: bool = False  # words at ids spread over the vocabulary, not after the specials

    @property
    def tokens(self) -> int:
        return self.grid * self.grid

    @property
    def channel_multiplier(self) -> list[int]:
        levels = (self.image_size // self.grid).bit_length()  # 2^(levels - 1) = image_size / grid
        return ([1, 1, 2, 2, 4] + [4] * levels)[:levels]


SMALL = JanusShape(
    text_vocab=100, codes=64, grid=4, image_size=32,
    special_ids={name: i for i, name in enumerate(SPECIAL_TOKENS)},
)
# deepseek-community/Janus-Pro-1B: config.json, generation_config.json and the tokenizer's ids.
JANUS_PRO = JanusShape(
    text_vocab=102400, codes=16384, grid=24, image_size=384, max_position_embeddings=16384, spread_words=True,
    special_ids={
        "bos": 100000, "eos": 100001, "pad": 100015, "boi": 100016, "image": 100581, "eoi": 100593,
        "unk": 100002, "user": 100005, "assistant": 100006,
    },
)


def vocabulary(shape: JanusShape) -> dict[str, int]:
    """Every id of the text vocabulary gets a token: the specials at their ids, the words and ':'
    after the specials or spread over the vocabulary, fillers elsewhere."""
    taken = dict(zip(shape.special_ids.values(), (SPECIAL_TOKENS[k] for k in shape.special_ids)))
    if len(taken) != len(shape.special_ids) or max(taken) >= shape.text_vocab:
        raise ValueError(f"special ids {shape.special_ids} must be distinct and < {shape.text_vocab}")
    words = WORDS + [":"]
    free = [i for i in range(shape.text_vocab) if i not in taken]
    if shape.spread_words:
        step = len(free) // len(words)
        spots = [free[step // 2 + j * step] for j in range(len(words))]
    else:
        spots = free[: len(words)]
    taken.update(zip(spots, words))
    vocab = {token: i for i, token in taken.items()}
    vocab.update({f"<|filler_{i}|>": i for i in range(shape.text_vocab) if i not in taken})
    return vocab


def build_tokenizer(shape: JanusShape = SMALL):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary(shape)
    special = [SPECIAL_TOKENS[k] for k in shape.special_ids]
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    bos = SPECIAL_TOKENS["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    s = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=s["eos"], pad_token=s["pad"], unk_token=s["unk"],
        extra_special_tokens={"image_token": s["image"], "boi_token": s["boi"], "eoi_token": s["eoi"]},
        additional_special_tokens=[s["boi"], s["eoi"], s["image"], s["user"], s["assistant"]],
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_janus(
    path: Path, shape: JanusShape = SMALL, sharpness: float = 6.0, seed: int = 0, guidance_scale: float = 2.0,
    generation_overrides: dict | None = None,
) -> Path:
    """`sharpness` scales the generation head (larger: more peaked image-token distributions).
    `generation_overrides` replaces keys of generation_config.json (None values delete them)."""
    import json

    from transformers import (
        GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor, LlamaConfig,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer(shape)
    ids = shape.special_ids
    text = LlamaConfig(
        vocab_size=shape.text_vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=shape.image_size,
        patch_size=shape.image_size // shape.grid, projection_dim=64, num_image_tokens=shape.tokens, depth=1,
    )
    vq = dict(
        embed_dim=8, num_embeddings=shape.codes, latent_channels=32, base_channels=32,
        channel_multiplier=shape.channel_multiplier, num_res_blocks=1, projection_dim=64, image_token_embed_dim=64,
    )
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids["image"], dtype="float32")
    model = JanusForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers' init (std 0.02) makes every position look alike; unit-variance
        # activations make the image tokens depend on the prompt and on the tokens before them.
        generation = (model.model.language_model, model.model.generation_aligner, model.model.generation_head)
        for module in generation:
            for layer in module.modules():
                if isinstance(layer, torch.nn.Linear):
                    layer.weight.normal_(std=layer.in_features**-0.5)
        model.model.generation_embeddings.weight.normal_()
        model.model.language_model.embed_tokens.weight.normal_()
        model.model.generation_head.vision_head.weight.mul_(sharpness)
    model.save_pretrained(path)
    # What Janus-Pro's generation_config.json holds for image generation.
    GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"],
        guidance_scale=guidance_scale, generation_kwargs={"boi_token_id": ids["boi"]},
    ).save_pretrained(path)
    if generation_overrides:
        file = Path(path) / "generation_config.json"
        generation = json.loads(file.read_text())
        generation.update(generation_overrides)
        file.write_text(json.dumps({k: v for k, v in generation.items() if v is not None}))
    image_processor = JanusImageProcessor(size={"height": shape.image_size, "width": shape.image_size})
    JanusProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=shape.tokens).save_pretrained(path)
    return Path(path)

