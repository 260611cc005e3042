"""A tiny random Lumina-mGPT folder with Lumina-mGPT-7B-768's real shapes: vocabulary 65536, the
8192 image codes at ids 4..8195 (`IMGIMG*` names), <eoss> 8196, <racm3:break> 8197, the end of a
turn <reserved08706> 8710, the new line <reserved08799> 8803, the size tokens <reserved08800+n> at
8804 + n, a context of 4096 and the 768-px grid (48 x 48 codes) by default.  Only widths and depths
shrink (hidden 64, 2 layers, a small VQ).  The architecture is Lumina-mGPT's
`ChameleonXLLMXForConditionalGeneration`; transformers loads the folder as Chameleon.

The code tokens' names are in lexicographic order over their ids, so an id's VQ code is a
permutation of `id - 4` (whatever the real order, the family reads codes from names).  The text
tokens are the 256 byte tokens of a byte-level BPE at ids 10000.. (not Chameleon's real text ids,
which no test relies on); `<s>` 0, `<pad>` 1, `</s>` 2.

`build_tiny_vqgan` writes a Chameleon VQGAN in Meta's file layout (vqgan.yaml, vqgan.ckpt) with
its shapes where they matter (8192 codes, five levels: 16 px per code, no attention but the
middle's) and small widths, from taming-transformers' modules with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_tokenizers import byte_tokens, write_byte_level_tokenizer

VOCAB_SIZE, CODES, CONTEXT = 65536, 8192, 4096
CODE_START, IMAGE_END, IMAGE_START = 4, 8196, 8197
END_OF_TURN, END_OF_ROW, SIZE_ZERO = 8710, 8803, 8804
FIRST_BYTE = 10000


def vocabulary() -> tuple[dict[str, int], dict[str, int]]:
    from vllm_sjdpp.families.lumina import code_name

    special = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<eoss>": IMAGE_END, "<racm3:break>": IMAGE_START}
    special.update({f"<reserved{n:05d}>": n + 4 for n in range(8194, 8800 + 129)})
    codes = sorted(code_name(c) for c in range(CODES))
    special.update({name: CODE_START + i for i, name in enumerate(codes)})
    return {**byte_tokens(FIRST_BYTE), **special}, special


def write_tokenizer(out: Path) -> dict[str, int]:
    vocab, special = vocabulary()
    write_byte_level_tokenizer(out, vocab, special, {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
    })
    return vocab


def build_tiny_lumina(out: Path, seed: int = 0) -> Path:
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(out)
    vq = dict(
        embed_dim=4, num_embeddings=CODES, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 2, 2, 4],
        num_res_blocks=1, attn_resolutions=[], resolution=768,
    )
    config = ChameleonConfig(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=CONTEXT, bos_token_id=0, pad_token_id=1, eos_token_id=END_OF_TURN,
        vq_config=vq, vocabulary_map=vocab,
    )
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    with torch.no_grad():
        # As the tiny Emu3: random layers and head scaled up, so that streams depend on the
        # prompt at a few nats per position; the per-head norms get weights of their own.
        for name, weight in model.model.layers.named_parameters():
            if "proj" in name:
                weight.mul_(10.0)
            elif "_norm" in name and "self_attn" in name:
                weight.normal_(1.0, 0.3) if name.endswith("weight") else weight.normal_(0.0, 0.3)
        model.lm_head.weight.mul_(40.0)
    model.save_pretrained(out)
    config_path = out / "config.json"
    saved = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**saved, "architectures": ["ChameleonXLLMXForConditionalGeneration"]}))
    return out


VQGAN_DDCONFIG = dict(
    double_z=False, z_channels=4, resolution=512, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2, 2, 4],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)
VQGAN_EMBED_DIM = 4


def taming_vqgan(ddconfig: dict, n_embed: int, embed_dim: int):
    """A VQGAN from taming-transformers' own modules, named as Meta's checkpoint names them:
    `encoder`, `decoder`, `quant_conv`, `post_quant_conv`, `quantize.embedding` (a ModuleDict)."""
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder

    modules = torch.nn.ModuleDict({
        "encoder": Encoder(**ddconfig), "decoder": Decoder(**ddconfig),
        "quant_conv": torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1),
        "post_quant_conv": torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1),
    })
    modules["quantize"] = torch.nn.Module()
    modules["quantize"].embedding = torch.nn.Embedding(n_embed, embed_dim)
    return modules.eval()


def save_vqgan(out: Path, modules, ddconfig: dict, n_embed: int, embed_dim: int, extra_state=None) -> Path:
    """vqgan.yaml and vqgan.ckpt (state_dict, plus `extra_state`) in Meta's layout."""
    import torch
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {**modules.state_dict(), **(extra_state or {})}, "global_step": 1}, out / "vqgan.ckpt")
    params = {"embed_dim": embed_dim, "n_embed": n_embed, "ddconfig": ddconfig, "lossconfig": {"target": "x"}}
    (out / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}))
    return out


def build_tiny_vqgan(out: Path, seed: int = 0) -> Path:
    import torch

    torch.manual_seed(seed)
    return save_vqgan(out, taming_vqgan(VQGAN_DDCONFIG, CODES, VQGAN_EMBED_DIM), VQGAN_DDCONFIG, CODES, VQGAN_EMBED_DIM)
