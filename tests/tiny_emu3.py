"""A tiny random Emu3 folder with Emu3-Gen's real shapes: text vocabulary 184622, the special
ids (<|extra_200|> end of line 151846, <|extra_201|> 151847, <|extra_203|> BOS 151849,
<|extra_204|> EOS 151850, <|image token|> 151851, <|image start|> 151852, <|image end|> 151853),
32768 visual tokens at 151854.., a context of 9216 and the processor's default 90 x 90 grid.
Only widths and depths shrink (hidden 64, 2 layers, grouped queries; a small VQ).

The tokenizer is byte-level BPE with the 256 byte tokens at ids 0..255 (the size text of the
image header, "5*5", is spelled in them) and every special and visual token at its real id;
config.json's `vocabulary_map` is its whole vocabulary, as transformers' conversion writes it.
The image processor normalises with mean = std = 0.5, BAAI's (the VQ decodes to [-1, 1]).
"""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizers import byte_tokens, write_byte_level_tokenizer

VOCAB_SIZE, CODEBOOK, CONTEXT = 184622, 32768, 9216
PAD, FIRST_EXTRA, IMAGE_TOKEN, FIRST_VISUAL = 151643, 151646, 151851, 151854


def vocabulary() -> tuple[dict[str, int], dict[str, int]]:
    special = {"<|endoftext|>": PAD, "<|im_start|>": PAD + 1, "<|im_end|>": PAD + 2}
    special.update({f"<|extra_{i}|>": FIRST_EXTRA + i for i in range(1, 205)})
    special["<image>"] = FIRST_EXTRA  # transformers' name for <|extra_0|>
    special.update({"<|image token|>": IMAGE_TOKEN, "<|image start|>": IMAGE_TOKEN + 1, "<|image end|>": IMAGE_TOKEN + 2})
    special.update({f"<|visual token {i:06d}|>": FIRST_VISUAL + i for i in range(CODEBOOK)})
    return {**byte_tokens(0), **special}, special


def write_tokenizer(out: Path) -> dict[str, int]:
    vocab, special = vocabulary()
    write_byte_level_tokenizer(out, vocab, special, {
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<|extra_203|>", "eos_token": "<|extra_204|>",
        "pad_token": "<|endoftext|>",
        "extra_special_tokens": {
            "image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
            "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>",
        },
    })
    return vocab


def build_tiny_emu3(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    text = dict(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=CONTEXT,
    )
    vq = dict(
        codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 2, 2, 4],
        num_res_blocks=1, attn_resolutions=[], hidden_size=128, temporal_downsample_factor=4,
    )
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(Emu3Config(text_config=text, vq_config=vq, vocabulary_map=vocab)).eval()
    with torch.no_grad():
        # Random init is nearly blind to context (the residual stream is the last token's
        # embedding) and flat: layers 10x and the head 40x give streams that depend on the
        # prompt, at 1-3 nats per position (greedy ties are rare; drafts get accepted).
        for name, weight in model.model.text_model.named_parameters():
            if "proj" in name:
                weight.mul_(10.0)
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out)
    image_processor = Emu3ImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    Emu3Processor(image_processor=image_processor, tokenizer=AutoTokenizer.from_pretrained(out)).save_pretrained(out)
    return out
