"""The digit model's token stream, image codebook, data, quality metric and the bundled checkpoint."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from vllm_sjdpp.digits import data, quality
from vllm_sjdpp.digits.tokens import (
    BOI, BOS, EOI, EOL, GENERATED_LENGTH, IMAGE_SIZE, IMAGE_TOKENS, PAD, ROW_WIDTH, build_tokenizer,
    codes_to_ids, ids_to_codes, ids_to_image, image_to_ids, prompt_ids, to_png, unconditional_prompt_ids,
)
from vllm_sjdpp.digits.train import DEFAULT_OUT
from vllm_sjdpp.families.rule import UnconditionalRule
from vllm_sjdpp.digits.vq import CODES, GRID, Codebook, bundled

RNG = np.random.default_rng(0)


def _codes():
    return RNG.integers(0, CODES, size=(GRID, GRID))


def _image():
    return RNG.uniform(0, 16, size=(IMAGE_SIZE, IMAGE_SIZE))


def test_stream_round_trip():
    codes = _codes()
    ids = codes_to_ids(codes)
    assert len(ids) == GENERATED_LENGTH and ids[-1] == EOI and ids[ROW_WIDTH - 1] == EOL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(ids_to_codes(ids), codes)
        assert np.array_equal(ids_to_image(ids), bundled().decode(codes))
    assert image_to_ids(bundled().decode(codes)) == ids


def test_unconditional_prompt_drops_the_class_only():
    prompts = [prompt_ids(d) for d in range(10)]
    uncond = [unconditional_prompt_ids(p) for p in prompts]
    assert all(u == uncond[0] for u in uncond)  # one prompt for every class
    assert uncond[0] == [BOS] + [PAD] * (len(prompts[0]) - 2) + [BOI]


def test_codebook_round_trips_codes_and_real_digits():
    codebook = bundled()
    codes = _codes()
    assert np.array_equal(codebook.encode(codebook.decode(codes)), codes)
    images8, _ = data.load_digits_8x8()
    real = [data.upscale(im) for im in images8[::10]]
    # 2x2 patches of 17 grey levels in 256 codes: about 0.23 grey levels off per pixel.
    error = np.mean([np.abs(codebook.decode(codebook.encode(im)) - im).mean() for im in real])
    assert error < 0.4
    # The image itself decides the codes: a shifted copy gets different ones.
    assert not np.array_equal(codebook.encode(real[0]), codebook.encode(np.roll(real[0], 2, axis=1)))


def test_codebook_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="codebook is"):
        Codebook(np.zeros((CODES - 1, 4)))
    with pytest.raises(ValueError, match="image must be"):
        bundled().encode(np.zeros((IMAGE_SIZE, IMAGE_SIZE + 1)))
    with pytest.raises(FileNotFoundError, match="no image codebook"):
        Codebook.load(tmp_path)
    bundled().save(tmp_path)
    assert np.array_equal(Codebook.load(tmp_path).centroids, bundled().centroids)


def _cut_after_100_tokens(codes):  # 5 whole rows of 17 tokens, then 15 codes of row 5
    kept = np.zeros_like(codes)
    kept[:5] = codes[:5]
    kept[5, :15] = codes[5, :15]
    return kept


def _one_long_row(codes):  # no <eol>: the first 16 codes make row 0
    kept = np.zeros_like(codes)
    kept[0] = codes[0]
    return kept


@pytest.mark.parametrize(
    "mangle, problem, best_effort",
    [
        (lambda ids: ids[:-1], "no <eoi>", lambda codes: codes),
        (lambda ids: ids[:100] + [EOI], "rows", _cut_after_100_tokens),
        (lambda ids: ids[:10] + [BOI] + ids[10:], f"non-image token {BOI}", lambda codes: codes),
        (lambda ids: [t for t in ids if t != EOL], "rows", _one_long_row),
        (lambda ids: ids + [3, 4], "after <eoi>", lambda codes: codes),
    ],
)
def test_malformed_streams_warn_or_raise(mangle, problem, best_effort):
    """Non-strict: a warning and the best-effort grid, worked out here (codes where the stream
    has them, 0 elsewhere); strict: ValueError."""
    codes = _codes()
    ids = mangle(codes_to_ids(codes))
    with pytest.warns(UserWarning, match=problem):
        image = ids_to_image(ids)
    assert np.array_equal(image, bundled().decode(best_effort(codes)))
    with pytest.raises(ValueError, match=problem):
        ids_to_image(ids, strict=True)


def test_text_prompt_maps_to_the_class_prompt():
    tokenizer = build_tokenizer()
    for d in range(10):
        assert tokenizer(f"a handwritten {d}").input_ids == prompt_ids(d)
    with pytest.raises(ValueError):
        prompt_ids(10)


def test_png_grid(tmp_path):
    from PIL import Image

    to_png([_image() for _ in range(12)], tmp_path / "g.png", columns=5, scale=2)
    width, height = Image.open(tmp_path / "g.png").size
    assert (width, height) == ((5 * (IMAGE_SIZE + 2) + 2) * 2, (3 * (IMAGE_SIZE + 2) + 2) * 2)
    with pytest.raises(ValueError):
        to_png([], tmp_path / "none.png")


def test_augmentation_keeps_grey_levels_and_the_digit():
    images8, labels = data.load_digits_8x8()
    judge = quality.judge()
    rng = np.random.default_rng(1)
    augmented = [data.augment(images8[i], rng) for i in range(0, 1797, 3)]
    assert all(a.shape == (IMAGE_SIZE, IMAGE_SIZE) and a.min() >= 0 and a.max() <= 16 for a in augmented)
    # about 0.70 (shifts and rotations are not in the classifier's training data); chance is 0.1
    assert judge.accuracy(augmented, labels[0:1797:3]) > 0.5


def test_quality_metric_separates_real_from_noise():
    judge = quality.judge()
    assert judge.held_out_accuracy > 0.9
    real, labels = quality.real_images(held_out=True)
    train, _ = quality.real_images(held_out=False)
    assert judge.accuracy(real, labels) > 0.9
    noise = [_image() for _ in range(len(real))]
    real_vs_real = judge.frechet_distance(real, train[: len(real)])
    real_vs_noise = judge.frechet_distance(real, noise)
    assert real_vs_noise > 10 * real_vs_real


def test_bundled_model_folder():
    from transformers import AutoConfig, AutoTokenizer

    files = {p.name: p.stat().st_size for p in DEFAULT_OUT.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vq_codebook.json", "loss.png", "metrics.json"} <= set(files)
    assert sum(files.values()) <= 20 * 2**20
    config = AutoConfig.from_pretrained(DEFAULT_OUT)
    assert config.sjdpp == {"fresh_token_range": list(IMAGE_TOKENS), "row_width": ROW_WIDTH, "init": "above"}
    # Served with classifier-free guidance: the guided architecture, the rule class dropout
    # trained, a default scale from the sweep.
    assert config.architectures == ["GuidedLlamaForCausalLM"]
    rule = UnconditionalRule.from_config(config.sjdpp_guidance)
    assert rule.apply(prompt_ids(4)) == unconditional_prompt_ids(prompt_ids(4))
    generation = json.loads((DEFAULT_OUT / "generation_config.json").read_text())
    assert generation["guidance_scale"] > 1
    tokenizer = AutoTokenizer.from_pretrained(DEFAULT_OUT)
    assert tokenizer("a handwritten 7").input_ids == prompt_ids(7)
    metrics = json.loads((DEFAULT_OUT / "metrics.json").read_text())
    assert metrics["held_out_nll_nats_per_token"] < 1.0 and metrics["minutes"] <= 20


def test_bundled_model_is_the_digits_family():
    """The family interface on the bundled folder: found from config.json, text to the class
    prompt, tokens to the image `ids_to_image` makes (white on black, 0..255)."""
    from vllm_sjdpp import families

    family = families.load(DEFAULT_OUT)
    assert isinstance(family, families.DigitsFamily)
    assert family.tokens_per_image == GENERATED_LENGTH and family.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    assert family.prompt_ids("a handwritten 7") == prompt_ids(7)
    with pytest.raises(ValueError, match="handwritten"):
        family.prompt_ids("a red fox")
    stream = image_to_ids(_image())
    image = family.to_image(stream)
    assert image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(np.asarray(image) / 255 * 16, np.clip(ids_to_image(stream), 0, 16), atol=0.04)
    rule = families.family_of(family.config).unconditional_rule(family.config, {})
    assert rule.apply(prompt_ids(3)) == unconditional_prompt_ids(prompt_ids(3))
