"""The Chameleon VQGAN loaded from a user's vqgan.yaml and vqgan.ckpt into diffusers' `VQModel`
(`families.chameleon_vqgan`), against independent implementations of the same architecture on
random weights saved in the original key layout:
- the decoder half against taming-transformers' own `Decoder` (the VQGAN's reference code,
  MIT; a test-only dependency installed without its training dependencies);
- the encoder half against transformers' `ChameleonVQVAE` (Chameleon's encoder), codes equal.
A small configuration of the architecture: 3 levels (4 px per code), attention at the lowest.
Broken variant: attention's queries and keys mapped onto each other is caught.
"""

from __future__ import annotations

import pytest
import torch

DDCONFIG = dict(
    double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
    num_res_blocks=1, attn_resolutions=[4], dropout=0.0,
)
N_EMBED, EMBED_DIM = 64, 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """taming's Encoder and Decoder with random weights (norms too), the codebook and 1x1 convs,
    saved as vqgan.yaml + vqgan.ckpt (with a training part, not loaded) in a folder; (folder,
    modules by name)."""
    from tiny_lumina import save_vqgan, taming_vqgan

    torch.manual_seed(0)
    modules = taming_vqgan(DDCONFIG, N_EMBED, EMBED_DIM)
    with torch.no_grad():
        for name, p in modules.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    folder = save_vqgan(tmp_path_factory.mktemp("vqgan"), modules, DDCONFIG, N_EMBED, EMBED_DIM,
                        extra_state={"loss.discriminator.weight": torch.zeros(1)})
    return folder, modules


def test_decoding_equals_taming_transformers(reference):
    from vllm_sjdpp.families import chameleon_vqgan

    folder, ref = reference
    model = chameleon_vqgan.load(folder)
    codes = torch.randint(0, N_EMBED, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quant = ref["quantize"].embedding(codes)[None].permute(0, 3, 1, 2)
        expected = ref["decoder"](ref["post_quant_conv"](quant))[0]
        got = model.decode(model.quantize.get_codebook_entry(codes.flatten(), (1, 3, 5, EMBED_DIM)), force_not_quantize=True).sample[0]
    assert got.shape == expected.shape == (3, 12, 20)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    image = chameleon_vqgan.decode(model, codes.numpy())
    pixels = ((expected.clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert image.size == (20, 12) and (abs(torch.tensor(pixels).int() - torch.tensor(list(image.getdata())).view(12, 20, 3)) <= 1).all()


def test_a_mapping_that_swaps_attention_queries_and_keys_is_caught(reference, monkeypatch):
    from vllm_sjdpp.families import chameleon_vqgan

    folder, ref = reference
    monkeypatch.setitem(chameleon_vqgan.ATTENTION, "q", "to_k")
    monkeypatch.setitem(chameleon_vqgan.ATTENTION, "k", "to_q")
    model = chameleon_vqgan.load(folder)  # the same shapes: it loads
    codes = torch.randint(0, N_EMBED, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quant = ref["quantize"].embedding(codes)[None].permute(0, 3, 1, 2)
        expected = ref["decoder"](ref["post_quant_conv"](quant))[0]
        got = model.decode(model.quantize.get_codebook_entry(codes.flatten(), (1, 3, 5, EMBED_DIM)), force_not_quantize=True).sample[0]
    assert (got - expected).abs().max() > 1e-2


def test_encoding_equals_transformers_chameleon_vqvae(reference):
    from transformers import ChameleonVQVAE, ChameleonVQVAEConfig

    from vllm_sjdpp.families import chameleon_vqgan

    folder, ref = reference
    model = chameleon_vqgan.load(folder)
    config = ChameleonVQVAEConfig(
        embed_dim=EMBED_DIM, num_embeddings=N_EMBED, latent_channels=DDCONFIG["z_channels"], resolution=16,
        in_channels=3, base_channels=DDCONFIG["ch"], channel_multiplier=DDCONFIG["ch_mult"],
        num_res_blocks=DDCONFIG["num_res_blocks"], attn_resolutions=DDCONFIG["attn_resolutions"],
    )
    hf = ChameleonVQVAE(config).eval()
    state = {k: v for k, v in ref.state_dict().items() if k.split(".")[0] in ("encoder", "quant_conv", "quantize")}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and not [k for k in missing if not k.startswith("post_quant_conv")], (missing, unexpected)
    pixels = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = hf.encode(pixels)
        latents = model.quant_conv(model.encoder(pixels))
        _, _, (_, _, codes) = model.quantize(latents)
    hf_codes = expected.image_tokens if hasattr(expected, "image_tokens") else expected[2]
    assert torch.equal(codes.flatten(), hf_codes.flatten())
