"""The Chameleon VQGAN, which Lumina-mGPT decodes its images with, from the user's own files
(`vqgan.yaml` and `vqgan.ckpt`, as Meta's Chameleon release and Lumina-mGPT's `ckpts/chameleon/
tokenizer/` hold them), run in diffusers' `VQModel`.  No code of the original is shipped or
copied: the architecture is taming-transformers' VQGAN, which `VQModel` implements; only the
checkpoint's parameter names are mapped (`diffusers_name`).

vqgan.yaml, `model.params` (taming's layout): `n_embed` codes of `embed_dim`, and `ddconfig`:
`ch`, `ch_mult`, `num_res_blocks`, `attn_resolutions`, `z_channels`, `resolution`, `in_channels`,
`out_ch` (`double_z` false).  vqgan.ckpt: a PyTorch checkpoint whose "state_dict" holds
`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`, `quantize.embedding.weight` (and
training parts, `loss.*`, which are not loaded).  Loaded with `torch.load(weights_only=True)`.

Decoding: codes [H, W] -> codebook vectors -> post_quant_conv -> decoder -> [3, 16H, 16W] in
[-1, 1] -> 8-bit RGB (clamped, scaled, truncated), as Lumina-mGPT's `ImageTokenizer.pil_from_img_toks`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

CONFIG_FILE, WEIGHTS_FILE = "vqgan.yaml", "vqgan.ckpt"


def read_params(config_path: str | Path) -> dict[str, Any]:
    """vqgan.yaml's `model.params` (ValueError naming what it lacks)."""
    import yaml

    config = yaml.safe_load(Path(config_path).read_text())
    params = (config or {}).get("model", {}).get("params")
    if not isinstance(params, dict):
        raise ValueError(f"{config_path}: no model.params (a taming-transformers VQGAN config)")
    dd = params.get("ddconfig")
    needed = ("ch", "ch_mult", "num_res_blocks", "z_channels", "resolution")
    lacking = [k for k in ("n_embed", "embed_dim") if k not in params] + [f"ddconfig.{k}" for k in needed if k not in (dd or {})]
    if lacking:
        raise ValueError(f"{config_path}: model.params lacks {lacking}")
    if dd.get("double_z"):
        raise ValueError(f"{config_path}: ddconfig.double_z is true, not a VQGAN's encoder")
    # Variants of the architecture VQModel does not build: refused rather than decoded wrongly.
    unsupported = {k: dd[k] for k, ok in (("attn_type", "vanilla"), ("tanh_out", False), ("give_pre_end", False),
                                          ("resamp_with_conv", True)) if k in dd and dd[k] != ok}
    if unsupported:
        raise ValueError(f"{config_path}: ddconfig {unsupported} is not supported (diffusers' VQModel)")
    return params


def vq_model_config(params: dict[str, Any]) -> dict[str, Any]:
    """diffusers `VQModel` arguments for vqgan.yaml's `model.params`."""
    dd = params["ddconfig"]
    levels = len(dd["ch_mult"])
    attention = [dd["resolution"] // 2**i in (dd.get("attn_resolutions") or []) for i in range(levels)]
    return dict(
        in_channels=dd.get("in_channels", 3), out_channels=dd.get("out_ch", 3),
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)),
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]), layers_per_block=dd["num_res_blocks"],
        latent_channels=dd["z_channels"], sample_size=dd["resolution"], num_vq_embeddings=params["n_embed"],
        vq_embed_dim=params["embed_dim"], norm_num_groups=32,
    )


ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def diffusers_name(name: str, levels: int) -> str | None:
    """A checkpoint parameter's name in `VQModel` (`levels`: len(ch_mult)); None: not loaded."""
    if name == "quantize.embedding.weight" or name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name
    part, _, rest = name.partition(".")
    if part not in ("encoder", "decoder"):
        return None
    rest = re.sub(r"^mid\.block_(\d)\.", lambda m: f"mid_block.resnets.{int(m[1]) - 1}.", rest)
    rest = re.sub(r"^mid\.attn_1\.", "mid_block.attentions.0.", rest)
    if part == "encoder":
        rest = re.sub(r"^down\.(\d+)\.block\.", r"down_blocks.\1.resnets.", rest)
        rest = re.sub(r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions.", rest)
        rest = re.sub(r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0.", rest)
    else:  # taming's up[i] is the level at resolution / 2**i; diffusers' up_blocks start at the lowest
        rest = re.sub(r"^up\.(\d+)\.", lambda m: f"up.{levels - 1 - int(m[1])}.", rest)
        rest = re.sub(r"^up\.(\d+)\.block\.", r"up_blocks.\1.resnets.", rest)
        rest = re.sub(r"^up\.(\d+)\.attn\.", r"up_blocks.\1.attentions.", rest)
        rest = re.sub(r"^up\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0.", rest)
    rest = re.sub(r"^norm_out\.", "conv_norm_out.", rest)
    rest = rest.replace(".nin_shortcut.", ".conv_shortcut.")
    rest = re.sub(r"(attentions\.\d+)\.(norm|q|k|v|proj_out)\.", lambda m: f"{m[1]}.{ATTENTION[m[2]]}.", rest)
    return f"{part}.{rest}"


def convert(state: dict, levels: int) -> dict:
    """A checkpoint's state dict -> `VQModel`'s (attention's 1x1 convolutions become linear)."""
    out = {}
    for name, tensor in state.items():
        new = diffusers_name(name, levels)
        if new is None:
            continue
        if ".attentions." in new and re.search(r"\.(to_q|to_k|to_v|to_out\.0)\.weight$", new) and tensor.dim() == 4:
            tensor = tensor[:, :, 0, 0]
        out[new] = tensor
    return out


def load(folder: str | Path):
    """The VQGAN of `folder` (its vqgan.yaml and vqgan.ckpt) as a float32 `VQModel` in eval mode.
    FileNotFoundError naming the missing file; ValueError for a config or checkpoint that does
    not match."""
    import torch
    from diffusers import VQModel

    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: missing (the Chameleon VQGAN's {CONFIG_FILE} and {WEIGHTS_FILE})")
    params = read_params(folder / CONFIG_FILE)
    checkpoint = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{folder / WEIGHTS_FILE}: no state_dict")
    model = VQModel(**vq_model_config(params))
    missing, unexpected = model.load_state_dict(convert(state, len(params["ddconfig"]["ch_mult"])), strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS_FILE} does not match {folder / CONFIG_FILE}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    return model.to(torch.float32).eval()


def decode(model, codes) -> Any:
    """VQ codes [H, W] (ints) -> a PIL RGB image, 2**(levels - 1) pixels per code each way (16 for
    Chameleon's five levels)."""
    import numpy as np
    import torch
    from PIL import Image

    codes = torch.as_tensor(np.asarray(codes), dtype=torch.long)
    height, width = codes.shape
    with torch.no_grad():
        quant = model.quantize.get_codebook_entry(codes.flatten(), (1, height, width, model.config.vq_embed_dim))
        pixels = model.decode(quant, force_not_quantize=True).sample[0]
    pixels = ((pixels.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()  # truncated, as Lumina-mGPT
    return Image.fromarray(pixels, "RGB")
