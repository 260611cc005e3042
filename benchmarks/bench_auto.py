"""The goodput controller (draft_token_budget="auto", the default) against plain decoding and
against full windows, on the digit model or its heavy twin, at each concurrency.

    python benchmarks/bench_auto.py [--model DIR] [--dtype bfloat16] [--concurrency 1,8,32,64]
                                    [--rounds 4] [--sustained WAVES] [--budgets 20,40,80]
                                    [--out benchmarks/results/auto_digits]

Two in-process engines: plain, and SJD++ with its defaults (k = 32, "auto").  The requests are
unseeded, as the controller adapts only those (a seed pins its request's windows).  First one
untimed round at every concurrency, in which the controller measures the pass cost and the
acceptance (a server would have done so on its first requests); then `rounds` rounds (times
8 / C below 8 concurrent images, whose few images vary more), each timing plain, "auto", full
windows (budget null) and no drafts (budget 0: SJD++'s floor) one after the other on the
same prompts (the last three on the one SJD++ engine), so every ratio is paired; the order
changes from round to round (`vllm_sjdpp.bench.williams_order`: over four rounds each mode runs
once in each place and after each other mode once, so a multiple of four rounds is balanced; in
one fixed order the last mode, no drafts, had always followed full windows, and the machine's
drift fell on each mode differently).  Reported per concurrency: median throughput ratios in
generated tokens per second (an unseeded image that draws its end token early is shorter: in
images per second a round of short plain images made plain look up to 7% faster), plain's rate
in 273-token images per second, the mean window the controller chose, and passes per image.
Writes <out>.json, <out>.md, <out>.png.

A round's C images start together and the round ends with its last: SJD++'s images finish
apart, so its round ends in a tail at low load (at 8 digit images, 24-45% of a round's time),
while plain's images, all 273 tokens, end together.  `--sustained WAVES` measures a server under
steady load instead: WAVES x C images a round, C in flight, a new one added as one ends.

`--budgets N,M,...` adds fixed draft-token budgets (`draft_token_budget` N: N drafts a pass,
shared evenly by the requests running, so a request's window widens as others end) as further
modes on the SJD++ engine, to tell whether any fixed budget beats no drafts where the controller
does not.  With B budgets there are 4 + B modes, plain included: the places balance over every
4 + B rounds, and what runs before each mode only where 4 + B is even.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)
from vllm_sjdpp.bench import draft_budgets, williams_order  # noqa: E402
from vllm_sjdpp.provenance import provenance  # noqa: E402

from vllm_sjdpp.config import AUTO  # noqa: E402
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH  # noqa: E402
from vllm_sjdpp.engine.runtime import runtime_of  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

WINDOW = 32
MODES = {"auto": '"auto"', "full": "full windows (budget null)", "none": "no drafts (budget 0)"}


def modes_of(budgets: list[int]) -> dict[str, str]:
    """The SJD++ modes reported, with their labels: `MODES`, then one per fixed budget."""
    return {**MODES, **{f"budget{b}": f"budget {b}" for b in budgets}}


def budget_of(mode: str):
    """The draft-token budget a mode runs the SJD++ engine with (plain runs on the other engine;
    the SJD++ engine keeps its default meanwhile)."""
    if mode.startswith("budget"):
        return int(mode.removeprefix("budget"))
    return {"plain": AUTO, "auto": AUTO, "full": None, "none": 0}[mode]


class WindowLog:
    """The windows the controller hands out, recorded per call."""

    def __init__(self, controller):
        self.lengths: list[float] = []
        real = controller.windows

        def windows(wanted, pinned):
            lengths = real(wanted, pinned)
            if any(wanted):
                self.lengths.append(float(np.mean(lengths)))
            return lengths

        controller.windows = windows

    def take(self) -> float:
        mean = float(np.mean(self.lengths)) if self.lengths else 0.0
        self.lengths = []
        return mean


def timed(llm, concurrency: int, waves: int = 0) -> tuple[float, float, int]:
    """Wall seconds for `concurrency` unseeded images at once, forward passes per image, and the
    tokens generated (an image that draws its end token early is shorter).  With `waves`,
    sustained load instead: waves * concurrency images, `concurrency` in flight, a new image
    added as soon as one ends (a batch of images that all start together ends in a tail at low
    load where SJD++'s images finish apart, and plain's, all 273 tokens long, do not)."""
    if not waves:
        tokens, wall, accepted, _ = bench_e2e.generate(llm, None, [i % 10 for i in range(concurrency)], seed=None)
        total = sum(map(len, tokens))
        return wall, (total - accepted) / concurrency, total
    from vllm.sampling_params import RequestOutputKind

    engine, images = llm.llm_engine, waves * concurrency
    params = llm.get_default_sampling_params().clone()
    params.max_tokens, params.seed, params.output_kind = GENERATED_LENGTH, None, RequestOutputKind.FINAL_ONLY
    accepted, _ = bench_e2e.counters(llm)
    added = total = 0
    start = time.perf_counter()

    def add() -> None:
        nonlocal added
        engine.add_request(f"sustained-{added}", {"prompt_token_ids": bench_e2e.prompt_ids(added % 10)}, params.clone())
        added += 1

    for _ in range(concurrency):
        add()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                total += len(out.outputs[0].token_ids)
                if added < images:
                    add()
    wall = time.perf_counter() - start
    return wall, (total - (bench_e2e.counters(llm)[0] - accepted)) / images, total


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--rounds", type=int, default=4,
                    help="paired rounds per concurrency, times 8 / C below 8 (the order balances over every 4, "
                         "every 4 + the budgets with --budgets)")
    ap.add_argument("--sustained", type=int, default=0, metavar="WAVES",
                    help="sustained load: WAVES x C images a round, C in flight, a new one as one ends "
                         "(default 0: C images at once)")
    ap.add_argument("--budgets", default="", metavar="N,M,...",
                    help="fixed draft-token budgets to time as well (each >= 1; default: none)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/auto_digits"))
    args = ap.parse_args(argv)
    try:
        modes = modes_of(draft_budgets(args.budgets))
    except ValueError as error:
        ap.error(str(error))
    started = provenance()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    cycle = len(modes) + 1  # plain's too
    uneven = [c for c in concurrencies if args.rounds * max(1, 8 // c) % cycle]
    if uneven or cycle % 2:
        print(f"bench_auto: the order of {cycle} modes balances their places over every {cycle} rounds"
              + (f" (not at {', '.join(map(str, uneven))} images)" if uneven else "")
              + ("; with an odd number of modes what runs before each is not balanced" if cycle % 2 else ""),
              file=sys.stderr)
    engine = dict(enforce_eager=True, max_model_len=GENERATED_LENGTH + 64, seed=0, disable_log_stats=False,
                  max_num_seqs=max(64, max(concurrencies)), dtype=args.dtype)
    start = time.perf_counter()
    plain = LLM(str(args.model), **engine)
    sjdpp = LLM(str(args.model), speculative_config={"method": "sjdpp", "num_speculative_tokens": WINDOW}, **engine)
    runtime = runtime_of(sjdpp)
    assert runtime.config.draft_token_budget == AUTO
    controller = runtime.goodput
    log = WindowLog(controller)
    for c in tqdm(concurrencies, desc="warm-up"):
        timed(sjdpp, c, args.sustained)
    result = {"model": str(args.model), "dtype": args.dtype, "window": WINDOW, "rounds": args.rounds,
              "sustained_waves": args.sustained, "modes": modes, "concurrency": {}, "provenance": started}
    for c in tqdm(concurrencies, desc="paired rounds"):
        log.take()
        rows: dict[str, list] = {"plain": [], **{m: [] for m in modes}}  # tokens / s
        passes: dict[str, list] = {m: [] for m in rows}
        windows = []
        for r in range(args.rounds * max(1, 8 // c)):  # small batches: images vary, more rounds
            for name in williams_order(r, tuple(rows)):
                with bench_e2e.draft_token_budget(sjdpp, budget_of(name)):
                    wall, p, tokens = timed(plain if name == "plain" else sjdpp, c, args.sustained)
                rows[name].append(tokens / wall)
                passes[name].append(p)
                if name == "auto":
                    windows.append(log.take())
                log.take()
        plain_rate = np.array(rows["plain"])
        result["concurrency"][c] = {
            "plain_images_per_s": float(np.median(plain_rate)) / GENERATED_LENGTH,
            **{f"{m}_tokens_per_s": float(np.median(rows[m])) for m in rows},
            **{f"{m}_x_plain": float(np.median(np.array(rows[m]) / plain_rate)) for m in modes},
            **{f"{m}_x_plain_rounds": (np.array(rows[m]) / plain_rate).tolist() for m in modes},
            **{f"{m}_passes_per_image": float(np.mean(passes[m])) for m in rows},
            "auto_mean_window": float(np.mean(windows)),
        }
    result["controller"] = controller.summary()
    result["minutes"] = (time.perf_counter() - start) / 60
    bench_e2e.write_results(args.out, result, markdown, plot)


def markdown(result: dict) -> str:
    extra = [m for m in result.get("modes", MODES) if m not in MODES]
    lines = [
        f"{result['model']} ({result['dtype']}), k = {result['window']}, median of {result['rounds']} paired rounds "
        "(x 8 / C below 8), "
        + (f"sustained load ({result['sustained_waves']} x C images a round, C in flight), "
           if result.get("sustained_waves") else "C images at once, ")
        + f"{result['minutes']:.1f} min; controller: {result['controller']}",
        "",
        "| concurrent images | plain images/s (273 tokens) | auto x plain | full windows x plain | no drafts x plain "
        + "".join(f"| {result['modes'][m]} x plain " for m in extra)
        + "| mean window (auto) | passes/image plain / auto / full" + "".join(f" / {result['modes'][m]}" for m in extra)
        + " |",
        "|---:|---:|---:|---:|---:|" + "---:|" * len(extra) + "---:|---|",
    ]
    for c, r in result["concurrency"].items():
        lines.append(
            f"| {c} | {r['plain_images_per_s']:.3f} | {r['auto_x_plain']:.2f} | {r['full_x_plain']:.2f} | "
            f"{r['none_x_plain']:.2f} | " + "".join(f"{r[m + '_x_plain']:.2f} | " for m in extra)
            + f"{r['auto_mean_window']:.1f} | {r['plain_passes_per_image']:.0f} / "
            f"{r['auto_passes_per_image']:.0f} / {r['full_passes_per_image']:.0f}"
            + "".join(f" / {r[m + '_passes_per_image']:.0f}" for m in extra) + " |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = [int(c) for c in result["concurrency"]]
    rows = list(result["concurrency"].values())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for i, (m, label) in enumerate(result.get("modes", MODES).items()):
        for c, r in zip(cs, rows):
            a.scatter([c] * len(r[f"{m}_x_plain_rounds"]), r[f"{m}_x_plain_rounds"], s=8, color=f"C{i}")
        a.plot(cs, [r[f"{m}_x_plain"] for r in rows], "o-", label=label, color=f"C{i}")
    a.axhline(1.0, color="k", lw=1)
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent images")
    a.set_ylabel("tokens/s, x plain (paired; dots: rounds)")
    a.legend()
    b.plot(cs, [r["auto_mean_window"] for r in rows], "o-")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrent images")
    b.set_ylabel("mean window chosen by the controller")
    b.set_ylim(0, result["window"] + 1)
    fig.suptitle(Path(result["model"]).name + ": goodput-adaptive windows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
