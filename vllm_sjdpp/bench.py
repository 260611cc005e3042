"""Measure SJD++ on your own checkpoint: plain decoding against SJD++ on one running server.

    VLLM_PLUGINS=sjdpp,sjdpp_images vllm serve FOLDER --speculative-config sjdpp &
    python -m vllm_sjdpp.bench --url http://localhost:8000 --prompt "a red fox in snow" \\
        [--images 4] [--in-flight 8] [--waves 3] [--rounds 4] [--size auto] [--seed 0] [--json bench.json]

Plain decoding is the same server with the per-request option `sjdpp_disable` (no drafts: one
token per forward pass), so both run on one machine, one model and one load, side by side:
- forward passes per image (from each image's `sjdpp.forward_passes`), one at a time and in
  flight (the controller drafts less under load): a figure of the model, its prompts and the
  load, not of the hardware;
- latency at one image: `--images` seeds, each made both ways (which goes first alternates:
  `abba`), the median wall time of a request;
- throughput at N = `--in-flight` images: `--rounds` rounds each way, in the same alternating
  order, of W x N requests (W = `--waves`; seeds seed .. seed + W * N - 1) with N in flight: a
  new request as soon as one ends, as `vllm bench serve --max-concurrency N` keeps a server
  loaded.  N requests started together and awaited together end in a tail at low load where
  SJD++'s images finish apart and plain decoding's do not; here only a round's last requests
  drain so (about one wave in W); each mode's images over its rounds' summed wall time, in
  images per second.  A machine's speed drifts between minutes (a 2-core CPU's by tens of
  percent), so all plain and then all SJD++ would compare two moments of the machine as much as
  the two decodings;
- whether each seed gave the same PNG both ways: the promise the server's start-up probe
  reports as `seed_identical` (true, false, or null where it did not probe); a seed that gave
  two PNGs in two runs of one mode (alone or in a batch) is counted apart, compared with nothing.

The table goes to stdout, the JSON (every request's timing, passes and PNG hash, and the
client's provenance: `vllm_sjdpp.provenance`) to `--json`.
Errors (a server that does not answer, a refused request) are one line on stderr, exit status 1.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import hashlib
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .config import IMAGES_ROUTE as ROUTE
from .serving.client import error_text
DEFAULT_PROMPT = "a red fox in the snow"


class BenchError(RuntimeError):
    pass


@dataclass
class ImageRun:
    """One image request: its mode ("plain" or "sjdpp"), seed, wall time in seconds, forward
    passes, tokens, and the SHA-256 of its PNG."""

    mode: str
    seed: int
    seconds: float
    forward_passes: int
    tokens: int
    png_sha256: str
    seed_identical: bool | None


def abba(r: int, first: Any = "plain", second: Any = "sjdpp") -> tuple[Any, Any]:
    """The order of round `r`'s two modes: first, second in rounds 0, 3, 4, 7, ..., the other way
    in rounds 1, 2, 5, 6, ... (ABBA), so that a drift linear in time over four rounds falls on
    both modes alike."""
    return (first, second) if r % 4 in (0, 3) else (second, first)


def williams_order(r: int, modes: tuple) -> tuple:
    """The order of round `r`'s modes (a Williams design; for two, `abba`): over each len(modes)
    rounds each mode runs once in each place and, for an even number of modes, right after each
    other mode once, so neither the machine's drift nor what ran just before a mode (a warm or
    cold cache) favours one; only whole cycles of len(modes) rounds are balanced.  Row r is
    (0, 1, n-1, 2, n-2, ...) + r, mod n."""
    n = len(modes)
    first = [0] + [(i + 1) // 2 if i % 2 else n - i // 2 for i in range(1, n)]
    return tuple(modes[(f + r) % n] for f in first)


def draft_budgets(text: str) -> list[int]:
    """`benchmarks/bench_auto.py --budgets`: comma-separated draft-token budgets (each a whole
    number >= 1: no drafts and full windows are modes of their own), sorted, each once.  Raises
    ValueError naming the option."""
    try:
        budgets = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        budgets = None
    if budgets is None or any(b < 1 for b in budgets):
        raise ValueError(f"--budgets {text!r}: whole numbers >= 1, comma-separated "
                         "(no drafts and full windows run anyway)")
    return budgets


def request_image(http, url: str, body: dict, mode: str, seed: int) -> ImageRun:
    """POST one image (n=1) and time it; raises BenchError with the server's message."""
    sent = {**body, "n": 1, "seed": seed, **({"sjdpp_disable": True} if mode == "plain" else {})}
    start = time.perf_counter()
    response = http.post(url.rstrip("/") + ROUTE, json=sent)
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        try:
            why = error_text(response.json()["error"], response.text[:500])
        except (ValueError, KeyError, TypeError, AttributeError):
            why = response.text[:500]
        raise BenchError(f"{response.status_code} from {ROUTE}: {why}")
    image = response.json()["data"][0]
    info = image["sjdpp"]
    digest = hashlib.sha256(base64.b64decode(image["b64_json"])).hexdigest()
    return ImageRun(mode, seed, seconds, info["forward_passes"], info["tokens"], digest, info.get("seed_identical"))


def in_flight(request, count: int, concurrency: int) -> list:
    """`request(i)` for i = 0 .. count - 1, `concurrency` at a time: the next starts as soon as one
    ends, so the server holds `concurrency` requests until the last ones (what a throughput at that
    many in flight means, as `vllm bench serve --max-concurrency` measures it).  Batches started
    together and awaited together instead end in a tail at low load wherever their requests
    finish apart (SJD++'s do, plain decoding's do not), which is `benchmarks/bench_auto.py`'s
    default load.  Returns the results in order."""
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(request, range(count)))


def run_in_flight(http, url: str, body: dict, mode: str, seeds: list[int], concurrency: int) -> tuple[list[ImageRun], float]:
    """One image per seed, `concurrency` in flight (`in_flight`): their runs and the wall seconds."""
    start = time.perf_counter()
    runs = in_flight(lambda i: request_image(http, url, body, mode, seeds[i]), len(seeds), concurrency)
    return runs, time.perf_counter() - start


def summarize(latency: list[ImageRun], batch: dict[str, tuple[list[ImageRun], float]]) -> dict:
    """The figures of a bench run (see the module docstring); ratios are SJD++ over plain, so
    above 1 is better for passes saved, latency saved and throughput."""
    def of(runs, mode):
        return [r for r in runs if r.mode == mode]

    in_flight = [r for runs, _ in batch.values() for r in runs]
    every = latency + in_flight
    passes = {m: statistics.mean(r.forward_passes for r in of(latency, m)) for m in ("plain", "sjdpp")}
    passes_in_flight = {m: statistics.mean(r.forward_passes for r in of(in_flight, m)) for m in ("plain", "sjdpp")}
    seconds = {m: statistics.median(r.seconds for r in of(latency, m)) for m in ("plain", "sjdpp")}
    throughput = {m: len(runs) / wall for m, (runs, wall) in batch.items()}
    pngs: dict[int, dict[str, str | None]] = {}
    for r in every:
        seen = pngs.setdefault(r.seed, {})
        if r.mode not in seen:
            seen[r.mode] = r.png_sha256
        elif seen[r.mode] != r.png_sha256:
            seen[r.mode] = None  # one seed, one mode, two PNGs in two runs: not repeatable, compared with nothing
    both = [p for p in pngs.values() if "plain" in p and "sjdpp" in p]
    repeatable = [p for p in both if p["plain"] is not None and p["sjdpp"] is not None]
    verdicts = {r.seed_identical for r in every}
    return {
        "passes_per_image": passes, "fewer_passes": passes["plain"] / passes["sjdpp"],
        "passes_per_image_in_flight": passes_in_flight,
        "fewer_passes_in_flight": passes_in_flight["plain"] / passes_in_flight["sjdpp"],
        "latency_s": seconds, "lower_latency": seconds["plain"] / seconds["sjdpp"],
        "images_per_s": throughput, "throughput": throughput["sjdpp"] / throughput["plain"],
        "identical_pngs": sum(p["plain"] == p["sjdpp"] for p in repeatable), "seeds_compared": len(repeatable),
        "unrepeatable_seeds": len(both) - len(repeatable),
        "server_seed_identical": verdicts.pop() if len(verdicts) == 1 else None,
    }


def table(summary: dict, in_flight: int) -> str:
    s = summary
    rows = [
        ("forward passes per image, 1 at a time", f"{s['passes_per_image']['plain']:.1f}",
         f"{s['passes_per_image']['sjdpp']:.1f}", f"{s['fewer_passes']:.2f}x fewer"),
        (f"forward passes per image, {in_flight} in flight", f"{s['passes_per_image_in_flight']['plain']:.1f}",
         f"{s['passes_per_image_in_flight']['sjdpp']:.1f}", f"{s['fewer_passes_in_flight']:.2f}x fewer"),
        ("latency, 1 image (median s)", f"{s['latency_s']['plain']:.3f}", f"{s['latency_s']['sjdpp']:.3f}",
         f"{s['lower_latency']:.2f}x lower"),
        (f"throughput, {in_flight} in flight (images/s)", f"{s['images_per_s']['plain']:.3f}",
         f"{s['images_per_s']['sjdpp']:.3f}", f"{s['throughput']:.2f}x"),
    ]
    lines = ["| | plain | SJD++ | SJD++ against plain |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    lines.append(f"\nsame PNG with SJD++ on and off: {s['identical_pngs']} of {s['seeds_compared']} seeds "
                 f"(the server's seed probe: seed_identical = {json.dumps(s['server_seed_identical'])})")
    if s["unrepeatable_seeds"]:
        lines.append(f"{s['unrepeatable_seeds']} seed(s) gave two PNGs in one mode (in two of its runs, alone or in "
                     f"a batch): this server's images depend on the batch")
    return "\n".join(lines)


def bench(url: str, body: dict, images: int, in_flight: int, seed: int, rounds: int = 4,
          progress: bool | None = None, waves: int = 3) -> dict:
    """Warm-up, latency and throughput runs against the server at `url`; the JSON record."""
    import httpx
    from tqdm import tqdm

    from .provenance import provenance

    started = provenance()
    total = 2 + 2 * images + 2 * waves * in_flight * rounds
    with httpx.Client(timeout=3600, limits=httpx.Limits(max_connections=max(in_flight, 1) + 2)) as http, \
            tqdm(total=total, unit="image", desc="bench", disable=None if progress is None else not progress) as bar:
        for mode in ("plain", "sjdpp"):  # compiles, caches and the seed probe's verdict out of the timings
            request_image(http, url, body, mode, seed)
            bar.update()
        latency = []
        for i in range(images):
            for mode in abba(i):
                latency.append(request_image(http, url, body, mode, seed + i))
                bar.update()
        runs: dict[str, list[ImageRun]] = {"plain": [], "sjdpp": []}
        walls: dict[str, list[float]] = {"plain": [], "sjdpp": []}
        for r in range(rounds):
            for mode in abba(r):
                images_run, wall = run_in_flight(http, url, body, mode, [seed + i for i in range(waves * in_flight)],
                                                 in_flight)
                runs[mode] += images_run
                walls[mode].append(wall)
                bar.update(waves * in_flight)
    return {
        "url": url, "body": body, "images": images, "in_flight": in_flight, "waves": waves, "rounds": rounds,
        "seed": seed,
        "summary": summarize(latency, {m: (runs[m], sum(walls[m])) for m in runs}),
        "latency_runs": [asdict(r) for r in latency],
        "throughput_runs": {m: {"wall_s": sum(walls[m]), "round_walls_s": walls[m], "runs": [asdict(r) for r in runs[m]]}
                            for m in runs},
        "provenance": started,  # the client's machine: the server's may be another
    }


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_sjdpp.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://localhost:8000", help="the server's base URL (default: %(default)s)")
    ap.add_argument("--model", default=None, help="the served model's name (default: the server's only one)")
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="the text prompt of every image (default: %(default)r)")
    ap.add_argument("--images", type=int, default=4, help="seeds timed one at a time, each both ways (default: %(default)s)")
    ap.add_argument("--in-flight", type=int, default=8, help="images in flight for throughput (default: %(default)s)")
    ap.add_argument("--waves", type=int, default=3,
                    help="images a throughput round: WAVES x --in-flight, a new one as one ends (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=4,
                    help="throughput rounds each way, in alternating order (default: %(default)s)")
    ap.add_argument("--size", default=None, help="WxH, or auto (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="the first seed (default: %(default)s)")
    ap.add_argument("--extra", type=json.loads, default={},
                    help='more body fields as JSON, e.g. \'{"guidance_scale": 3}\' (default: none)')
    ap.add_argument("--json", type=Path, default=None, help="write the record here (default: none)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def main(argv: list[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.images < 1 or args.in_flight < 1 or args.waves < 1 or args.rounds < 1:
        ap.error("--images, --in-flight, --waves and --rounds: at least 1")
    if not isinstance(args.extra, dict):
        ap.error("--extra: a JSON object")
    body = {"prompt": args.prompt, **({"model": args.model} if args.model else {}),
            **({"size": args.size} if args.size else {}), **args.extra}
    import httpx

    try:
        record = bench(args.url, body, images=args.images, in_flight=args.in_flight, seed=args.seed,
                       rounds=args.rounds, progress=None if not args.no_progress else False, waves=args.waves)
    except BenchError as e:
        sys.exit(f"error: {e}")
    except httpx.HTTPError as e:
        sys.exit(f"error: no answer from {args.url} ({type(e).__name__}: {e}); is `vllm serve` running there, "
                 f"with VLLM_PLUGINS=sjdpp,sjdpp_images?")
    print(table(record["summary"], args.in_flight))
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
