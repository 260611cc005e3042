"""A tiny random Janus folder in the Hugging Face format, built locally with transformers (no hub):
a 2-layer Llama with grouped queries, a 4x4 grid of image tokens over a 64-code VQ codebook
(32x32 pixels), a word-level tokenizer with Janus's special tokens and a Janus-like chat template.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["a", "the", "red", "blue", "green", "dog", "cat", "house", "tree", "under", "rain", "sun", "small", "big"]
SPECIAL = {
    "bos": "<|begin_of_sentence|>", "eos": "<|end_of_sentence|>", "pad": "<|pad|>", "unk": "<unk>",
    "boi": "<begin_of_image>", "eoi": "<end_of_image>", "image": "<image_placeholder>",
    "user": "<|User|>", "assistant": "<|Assistant|>",
}
CODES = 64  # the VQ codebook: image tokens are 0..63
TEXT_VOCAB = 100  # text ids; the codes share the id space positionally (see vllm_sjdpp.families.janus)
GRID = 4
IMAGE_SIZE = 32
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|User|>' if message['role'] == 'user' else '<|Assistant|>' }}: "
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}\n\n{% endfor %}"
    "{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)


def build_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Special tokens first, then words; ids up to TEXT_VOCAB are unused text ids.
    vocab = {t: i for i, t in enumerate(list(SPECIAL.values()) + WORDS + [":"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL["unk"]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(list(SPECIAL.values()))
    bos = SPECIAL["bos"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=SPECIAL["eos"], pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        extra_special_tokens={"image_token": SPECIAL["image"], "boi_token": SPECIAL["boi"], "eoi_token": SPECIAL["eoi"]},
        additional_special_tokens=[SPECIAL["boi"], SPECIAL["eoi"], SPECIAL["image"], SPECIAL["user"], SPECIAL["assistant"]],
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_janus(path: Path, sharpness: float = 6.0, seed: int = 0, guidance_scale: float = 2.0) -> Path:
    """`sharpness` scales the generation head (larger: more peaked image-token distributions)."""
    from transformers import (
        GenerationConfig, JanusConfig, JanusForConditionalGeneration, JanusImageProcessor, JanusProcessor, LlamaConfig,
    )

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    text = LlamaConfig(
        vocab_size=TEXT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
        bos_token_id=ids(SPECIAL["bos"]), eos_token_id=ids(SPECIAL["eos"]), pad_token_id=ids(SPECIAL["pad"]),
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=IMAGE_SIZE // GRID,
        projection_dim=64, num_image_tokens=GRID * GRID, depth=1,
    )
    vq = dict(
        embed_dim=8, num_embeddings=CODES, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2, 2],
        num_res_blocks=1, projection_dim=64, image_token_embed_dim=64,
    )
    config = JanusConfig(
        text_config=text, vision_config=vision, vq_config=vq, image_token_id=ids(SPECIAL["image"]),
        dtype="float32",
    )
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
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id,
        guidance_scale=guidance_scale, generation_kwargs={"boi_token_id": ids(SPECIAL["boi"])},
    ).save_pretrained(path)
    image_processor = JanusImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    JanusProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=GRID * GRID).save_pretrained(path)
    return Path(path)
