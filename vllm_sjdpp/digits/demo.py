"""Digits 0 to 9 from the bundled model through `vllm serve --speculative-config sjdpp`.

    python -m vllm_sjdpp.digits.demo [--out digits.png] [--model DIR] [--spec-config JSON]
                                     [--seed S] [--guidance-scale S] [--dtype auto]

Starts a vLLM server on loopback with SJD++ and the images endpoint (`VLLM_PLUGINS=sjdpp,
sjdpp_images`) and asks `POST /v1/images/generations` (the openai client's `images.generate`) for "a
handwritten 0" ... "a handwritten 9", decoded plainly (per-request `sjdpp_disable`) and with SJD++,
both with classifier-free guidance (the model's default scale from its generation_config.json unless
--guidance-scale is given), image i the digit i mod 10 with seed S + i: first one image at a time
(latency: images 0 .. 9, each made both ways before the next), then ten in flight (throughput: a new
request as soon as one ends, as `vllm bench serve --max-concurrency 10` keeps them; two rounds of 30
images each way); each load's rounds alternate which decoding goes first, as the machine's speed
drifts. Then a second server with full windows (`draft_token_budget: null`) makes the ten images
once more, one at a time: their step compression, which does not depend on the machine, and what a
full pass costs here against a plain one. A seed names one image, so the decodings give the same
PNGs; the picture puts them one above the other (plain on top, SJD++ below). Prints the CPU and the
dtype the server ran in, forward passes per image (from the responses), latency, throughput and each
ratio to plain decoding (at ten in flight also round by round: a 2-core machine's speed moves
within a run), the drafts per pass the controller chose (vLLM's /metrics) and the seed probe's
verdict, all measured in this run, and says so where drafting cannot pay on this machine.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bench import abba, in_flight
from ..config import SJDPPConfig
from ..serving.server import vllm_server
from .tokens import GENERATED_LENGTH, to_png
from .train import DEFAULT_OUT
from .vq import GREY_LEVELS, IMAGE_SIZE

DEFAULT_SPEC = {"method": "sjdpp"}  # the defaults, with the model folder's (init="above")


PLUGINS = "sjdpp,sjdpp_images"  # VLLM_PLUGINS: the endpoint plugin is opt-in


@dataclass
class Generation:
    digit: int
    image: np.ndarray  # grey levels 0..16, as the data
    forward_passes: int
    seconds: float  # the request's latency
    png: str  # as the server sent it (base64)
    seed_identical: bool | None = None  # the server's seed probe verdict (images endpoint)


def generate_digits(
    client, model: str, plain: bool, seed: int, concurrency: int, guidance_scale: float | None = None, progress=None,
    images: int = 10, first: int = 0,
) -> tuple[list[Generation], float]:
    """One image request each for i = `first` .. `first` + `images` - 1 (digit i mod 10 with seed
    `seed + i`) through `client` (an `openai.OpenAI` on the server), `concurrency` in flight
    (`bench.in_flight`).  Returns the images in that order and the wall seconds."""
    from PIL import Image

    extra = {"sjdpp_disable": plain}
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale

    def one(i: int) -> Generation:
        begin = time.perf_counter()
        digit = i % 10
        out = client.images.generate(
            model=model, prompt=f"a handwritten {digit}", n=1, size=f"{IMAGE_SIZE}x{IMAGE_SIZE}",
            response_format="b64_json", extra_body={**extra, "seed": seed + i},
        )
        image = out.data[0]
        grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(image.b64_json)))) / 255 * (GREY_LEVELS - 1)
        info = image.model_extra["sjdpp"]
        if progress is not None:
            progress.update(1)
        return Generation(digit, grey, info["forward_passes"], time.perf_counter() - begin, image.b64_json,
                          info.get("seed_identical"))

    start = time.perf_counter()
    gens = in_flight(lambda j: one(first + j), images, concurrency)
    return gens, time.perf_counter() - start


@dataclass
class Run:
    """One load, plain decoding against SJD++ on the same images (digits and seeds), in order."""

    concurrency: int
    plain: list[Generation]
    sjdpp: list[Generation]
    plain_wall: float
    sjdpp_wall: float
    # Per round, (plain, SJD++) wall seconds: how far single rounds' ratios scatter.
    round_walls: list[tuple[float, float]] = field(default_factory=list)

    def passes(self, gens: list[Generation]) -> float:
        return sum(g.forward_passes for g in gens) / len(gens)

    def latency(self, gens: list[Generation]) -> float:
        return sum(g.seconds for g in gens) / len(gens)

    def throughput(self, gens: list[Generation], wall: float) -> float:
        return len(gens) / wall

    def round_speeds(self) -> list[float]:
        """Each round's SJD++ throughput against plain's in the same round (the same images)."""
        return [plain / sjdpp for plain, sjdpp in self.round_walls]


@dataclass
class Machine:
    """What the numbers were measured on: the CPU and the dtype the server ran the model in."""

    cpu: str
    native_bf16: bool | None
    dtype: str

    def describe(self) -> str:
        bf16 = {True: "native bf16", False: "no native bf16", None: "bf16 support unknown"}[self.native_bf16]
        return f"{self.cpu} ({bf16}), the model in {self.dtype}"


@dataclass
class BatchCosts:
    """What the goodput controller measured, from its last periodic log line at one batch size
    (`GoodputController.summary`): pass seconds by positions at that batch size without and with
    drafts, and drafts accepted by window length (over every load)."""

    requests: int
    plain: dict[int, float]
    drafted: dict[int, float]
    accepted: dict[int, float]

    def sentence(self) -> str:
        """The pass without drafts (at one position a request, or the most measured) against the
        drafted pass of fewest positions, and what the shortest windows measured accepted."""
        plain = self.plain.get(self.requests, self.plain[max(self.plain)])
        positions = min(self.drafted)
        seconds = self.drafted[positions]
        out = (f"it measured a pass of its {self.requests} requests at {plain:.2g} s without drafts and a drafted one "
               f"of {positions} positions at {seconds:.2g} s ({seconds / plain:.1f}x)")
        if self.accepted:
            length = min(self.accepted)
            out += (f", and windows of {length} draft{'' if length == 1 else 's'} accepted "
                    f"{self.accepted[length]:.2g} drafts on average")
        return out


def _pairs(text: str) -> dict[int, float]:
    """The pairs of a summary's curve, "9: 0.011, 10: 0.012" as {9: 0.011, 10: 0.012}; ValueError
    where the text is not such pairs ("not measured yet", a line cut short)."""
    pairs = {int(k): float(v) for k, v in (item.split(": ") for item in text.split(", "))}
    if not pairs:
        raise ValueError(text)
    return pairs


def controller_costs(log_path: Path, requests: int) -> BatchCosts | None:
    """`BatchCosts` at `requests` requests from the server's log: its last summary there that
    measured passes both without and with drafts; None where none did (or none reads as such)."""
    import re

    found = re.findall(rf"pass s by positions at {requests} requests, no drafts: ([^;]*); with drafts: ([^;]*); "
                       r"drafts accepted by window length: ([^;]*); cap", log_path.read_text(errors="replace"))
    for plain, drafted, accepted in reversed(found):
        try:
            return BatchCosts(requests, _pairs(plain), _pairs(drafted), {} if "not measured" in accepted else _pairs(accepted))
        except ValueError:  # "not measured yet", or a line cut short: an earlier one may serve
            continue
    return None


LITTLE_DRAFTING = 1.0  # drafts per request-pass below which the report says what the controller measured at that load


def little_drafting(concurrency: int, drafted: float | None, costs: BatchCosts | None) -> list[str]:
    """Where the controller drafted less than LITTLE_DRAFTING a request-pass at `concurrency`,
    what it measured there (`costs`: from its log line, which the runtime writes only under
    "auto", so a server of another budget gives None and no line): so that a ratio near 1 reads
    as SJD++ running as plain decoding does, not as a loss or a gain of the method."""
    if costs is None or drafted is None or drafted >= LITTLE_DRAFTING:
        return []
    return [f"  The controller drafted little at {concurrency} in flight: {costs.sentence()}; so SJD++ ran nearly as "
            f"plain decoding does."]


def report(runs: list[Run], full: Run, window: int, machine: Machine, drafts_per_pass: dict[int, float],
           seed_identical: bool | None, costs: BatchCosts | None = None) -> list[str]:
    """What the demo prints, every figure measured in this run: passes, latency at one image in
    flight and throughput at ten against plain decoding under "auto"; the step compression of full
    windows (a property of the model and the method, not of the machine) and what such a pass
    cost here against a plain one; the drafts the controller chose; whether drafting can pay; and
    where the controller drafted little at ten in flight, what it measured there (`costs`, from
    the server's log), so that a ratio near 1 reads as what it is."""
    lines = [f"measured on {machine.describe()}",
             f"{'load':<20} {'mode':<12} {'passes/image':>12} {'s/image':>8} {'images/s':>8}  same PNG as plain"]
    for run, label in ((runs[0], "SJD++ auto"), (runs[1], "SJD++ auto"), (full, f"SJD++ k={window}")):
        load = "1 image at a time" if run.concurrency == 1 else f"{run.concurrency} images in flight"
        rows = [(label, run.sjdpp, run.sjdpp_wall)]
        if run is not full:
            rows.insert(0, ("plain", run.plain, run.plain_wall))
        for name, gens, wall in rows:
            same = "" if name == "plain" else f"{sum(a.png == b.png for a, b in zip(run.plain, gens))}/{len(gens)}"
            lines.append(f"{load:<20} {name:<12} {run.passes(gens):>12.1f} {run.latency(gens):>8.2f} "
                         f"{run.throughput(gens, wall):>8.2f}  {same}")
    one, many = runs
    compression = full.passes(full.plain) / full.passes(full.sjdpp)
    # seconds per pass, one image in flight: a drafted pass of up to k + 1 positions against a plain one
    cost = (full.latency(full.sjdpp) / full.passes(full.sjdpp)) / (full.latency(full.plain) / full.passes(full.plain))
    fewer_one, fewer_many = one.passes(one.plain) / one.passes(one.sjdpp), many.passes(many.plain) / many.passes(many.sjdpp)
    faster_one = one.latency(one.plain) / one.latency(one.sjdpp)
    speed = many.throughput(many.sjdpp, many.sjdpp_wall) / many.throughput(many.plain, many.plain_wall)
    lines += [
        f"Full windows (k = {window}): {compression:.2f} tokens per pass, {compression:.2f}x fewer forward passes "
        f"(the step compression: the model's and the method's, the same on any machine).",
        f"  Here a pass verifying up to {window} drafts cost {cost:.2f}x a plain one, so full windows would give "
        f"{compression / cost:.2f}x lower latency at one image.",
        f'"auto", 1 image at a time: SJD++ {fewer_one:.2f}x fewer forward passes, {faster_one:.2f}x lower latency '
        f"than plain decoding; the controller drafted {drafts_per_pass.get(1, 0.0):.1f} tokens per pass on average "
        f"and committed {fewer_one:.2f}.",
        f'"auto", {many.concurrency} images in flight: SJD++ {fewer_many:.2f}x fewer forward passes, {speed:.2f}x the '
        f"throughput of plain decoding; the controller drafted {drafts_per_pass.get(many.concurrency, 0.0):.1f} "
        f"tokens per request-pass.",
    ]
    if len(many.round_walls) > 1:
        lines.append(f"  Round by round: {', '.join(f'{r:.2f}x' for r in many.round_speeds())} (each round's SJD++ "
                     f"images against the same images plain, run just before or after them).")
    lines += little_drafting(many.concurrency, drafts_per_pass.get(many.concurrency), costs)
    if cost >= compression:
        lines.append(f"  Drafting cannot pay on this machine: a drafted pass costs {cost:.2f}x a plain one and commits "
                     f"{compression:.2f} tokens, so the controller keeps windows short or drafts nothing.")
    identical = all(a.png == b.png for run in (*runs, full) for a, b in zip(run.plain, run.sjdpp))
    probe = {True: "the server's seed probe found a position's logits bit-identical in wide and narrow passes",
             False: "the server's seed probe found logits that depend on the shape of the pass",
             None: "the server did not probe its seeds"}[seed_identical]
    lines.append(f"Same seed, same image with SJD++ on and off: {'every' if identical else 'NOT every'} image here; {probe}.")
    return lines


def spec_draft_tokens(base: str) -> float:
    """vLLM's count of draft tokens verified so far (its Prometheus counter on /metrics)."""
    import httpx

    text = httpx.get(base + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:spec_decode_num_draft_tokens_total"))


def served_dtype(log_path: Path) -> str:
    """The dtype vLLM loaded the model in, from the server's log."""
    import re

    found = re.findall(r"dtype=torch\.(\w+)", log_path.read_text(errors="replace"))
    return found[0] if found else "an unknown dtype"


def measure(base: str, model: Path, args, loads) -> tuple[list[Run], dict[int, float], bool | None]:
    """Plain and SJD++ images at each (concurrency, rounds, images a round) of `loads`; the drafts
    per pass the server verified for SJD++ at each load; the seed probe's verdict from the
    responses.

    A load's rounds alternate the two decodings (`bench.abba`: plain first in rounds 0, 3, 4, 7,
    ...), and each decoding's throughput is its images over its rounds' summed wall time: a
    2-core machine's speed drifts by tens of percent from one minute to the next (on a 2-core
    Xeon, float32, one round of ten digit images started together took 1.3 to 2.7 s, the same
    work each time, and single rounds' ratios scattered from 0.73x to 1.13x), so two decodings timed
    one after the other, all plain then all SJD++, compare two moments of the machine as much as
    the two decodings."""
    from openai import OpenAI
    from tqdm import tqdm

    runs, drafts, identical = [], {}, None
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)
    # One untimed image each way first: a fresh server's first passes compile and allocate.
    for plain in (True, False):
        generate_digits(client, str(model), plain, args.seed, 1, args.guidance_scale, images=1)
    for concurrency, rounds, count in loads:
        gens, drafted, passes, round_walls = {True: [], False: []}, 0.0, 0, []
        with tqdm(total=2 * count * rounds, unit="image", desc=f"plain and SJD++, {concurrency:>2} in flight") as bar:
            for r in range(rounds):
                this_round = {}
                for plain in abba(r, True, False):
                    before = None if plain else spec_draft_tokens(base)
                    made, wall = generate_digits(client, str(model), plain, args.seed, concurrency, args.guidance_scale,
                                                 progress=bar, images=count, first=r * count)
                    gens[plain] += made
                    this_round[plain] = wall
                    if not plain:
                        drafted += spec_draft_tokens(base) - before
                        passes += sum(g.forward_passes for g in made)
                        identical = made[0].seed_identical
                round_walls.append((this_round[True], this_round[False]))
        drafts[concurrency] = drafted / max(passes, 1)
        plain_wall, sjdpp_wall = (sum(walls) for walls in zip(*round_walls))
        runs.append(Run(concurrency, gens[True], gens[False], plain_wall, sjdpp_wall, round_walls))
    client.close()
    return runs, drafts, identical


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_sjdpp.digits.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT, help="the digit model's folder (default: the bundled one)")
    ap.add_argument("--out", type=Path, default=Path("digits.png"), help="the PNG of the images (default: %(default)s)")
    ap.add_argument("--spec-config", type=json.loads, default=DEFAULT_SPEC,
                    help="the server's --speculative-config, as JSON (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of image 0 (image i, the digit i mod 10: seed + i; default: %(default)s)")
    ap.add_argument("--guidance-scale", type=float, default=None,
                    help="classifier-free guidance scale (default: the model's generation_config.json)")
    ap.add_argument("--dtype", default="auto",
                    help="the server's --dtype (default auto: float32 on a CPU without native bf16, else bf16)")
    return ap


def main(argv: list[str] | None = None) -> None:
    from .. import machine

    ap = parser()
    args = ap.parse_args(argv)
    if not (args.model / "config.json").exists():
        ap.error(f"no model at {args.model}")

    log_dir = Path(tempfile.mkdtemp(prefix="sjdpp-demo-"))
    serve_args = ["--max-model-len", str(GENERATED_LENGTH + 64), "--max-num-seqs", "32", "--dtype", args.dtype]
    # The user's SJD++ options (the controller, "auto", by default), then full windows: their
    # step compression, and what a full pass costs on this machine.
    specs = (args.spec_config, {**args.spec_config, "draft_token_budget": None})
    results = []
    for spec, loads in zip(specs, (((1, 10, 1), (10, 2, 30)), ((1, 10, 1),))):
        log_path = log_dir / f"vllm-serve-{len(results)}.log"
        print(f"starting VLLM_PLUGINS={PLUGINS} vllm serve {args.model.name} --speculative-config "
              f"'{json.dumps(spec)}' (log: {log_path})")
        with vllm_server(args.model, ["--speculative-config", json.dumps(spec), *serve_args], log_path,
                         env={"VLLM_PLUGINS": PLUGINS}) as base:
            results.append(measure(base, args.model, args, loads))
        print("server stopped")
    (runs, drafts, identical), (full, _, _) = results

    one = runs[0]
    to_png([g.image for g in one.plain + one.sjdpp], args.out, columns=10)
    scale = args.guidance_scale
    if scale is None:
        scale = json.loads((args.model / "generation_config.json").read_text()).get("guidance_scale", 1.0)
    print(f"wrote {args.out}: digits 0-9 with seeds {args.seed}-{args.seed + 9}, plain decoding (top row) and "
          f"SJD++ (bottom row), guidance scale {scale}")
    window = args.spec_config.get("num_speculative_tokens", SJDPPConfig().num_speculative_tokens)
    measured_on = Machine(machine.cpu_name(), machine.native_bf16(), served_dtype(log_dir / "vllm-serve-0.log"))
    costs = controller_costs(log_dir / "vllm-serve-0.log", runs[1].concurrency)
    print("\n".join(report(runs, full[0], window, measured_on, drafts, identical, costs)))


if __name__ == "__main__":
    main()
