"""Where an engine step's time goes: plain decoding against SJD++, in milliseconds per step.

    python benchmarks/step_breakdown.py [--concurrency 1] [--budget null] [--seconds 15] [--compiled]
                                        [--dense-race] [--out benchmarks/results/step_breakdown.json]

Two in-process engines, one after the other (plain, then SJD++ with k = 32 and the given
draft-token budget: null for full windows, a number, or "auto"), each generating digit images
`concurrency` at a time for `seconds` after two untimed batches; eager, or with --compiled the
forward compiled as `vllm serve` runs it; --dense-race races keyed rows over their whole rows, as
the step did before `kernels/keyed_race.py` (to compare).  Methods of vLLM's model runner
and of the SJD++ sampler are wrapped with `perf_counter`; each row is the time spent inside one
method divided by the engine steps, so nested rows add up within their parent.  Wrappers rather
than a sampling profiler: py-spy, at 200 Hz on two cores, gave one of these methods 20 times the
time the wrapper measures.  Prints the table; writes it to <out>.md, and the milliseconds per step
by method name with the run's provenance to <out> (JSON).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_auto  # noqa: E402
import bench_e2e  # noqa: E402  (sets the in-process engine environment first)
from vllm_sjdpp.provenance import provenance  # noqa: E402

from vllm_sjdpp.digits.tokens import GENERATED_LENGTH  # noqa: E402
from vllm_sjdpp.digits.train import DEFAULT_OUT  # noqa: E402

RUNNER_ROWS = [  # (method, label)
    ("_update_states", "batch update"),
    ("_model_forward", "model forward"),
    ("_prepare_inputs", "input preparation"),
    ("sample_tokens", "sampling"),
    ("_bookkeeping_sync", "sampled tokens to the scheduler"),
    ("propose_draft_token_ids", "drafts proposed"),
]
SCHEDULER_ROWS = [
    ("schedule", "scheduling"),
    ("update_from_output", "scheduler's update from the output"),
]
SAMPLER_ROWS = [
    ("_process_all_rows", "vLLM's processing of all rows"),
    ("sjdpp_step", "`sjdpp_step`"),
    ("_plain_decoding_step", "windowless steps (vLLM's sampler)"),
    ("plan", "the plan (windows chosen)"),
    ("sample_per_request", "the noise or its keys (`StepNoise.sample_per_request`)"),
]


class Timers:
    def __init__(self):
        self.seconds: collections.Counter = collections.Counter()

    def wrap(self, owner, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        setattr(owner, name, timed)


def measure(llm, concurrency: int, seconds: float) -> dict[str, float]:
    """Milliseconds per engine step in each wrapped method, and for the whole step."""
    import vllm_sjdpp.engine.sampler as sampler_module

    timers = Timers()
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    steps = collections.Counter()
    execute = runner.execute_model

    def counted(*args, **kwargs):
        steps["n"] += 1
        return execute(*args, **kwargs)

    runner.execute_model = counted
    for name, _ in RUNNER_ROWS:
        timers.wrap(runner, name)
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    for name, _ in SCHEDULER_ROWS:
        timers.wrap(scheduler, name)
    runtime = bench_e2e.runtime_or_none(llm)
    original_step = sampler_module.sjdpp_step
    if runtime is not None:
        sampler = runtime.runner.rejection_sampler
        for name in ("_process_all_rows", "_plain_decoding_step"):
            timers.wrap(sampler, name)
        timers.wrap(runtime, "plan")
        timers.wrap(sampler_module, "sjdpp_step")
        original_noise = sampler_module.StepNoise.__dict__["sample_per_request"]  # the classmethod
        timers.wrap(sampler_module.StepNoise, "sample_per_request")
    try:
        for _ in range(2):
            bench_auto.timed(llm, concurrency)
        timers.seconds.clear()
        steps.clear()
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            bench_auto.timed(llm, concurrency)
        wall = time.perf_counter() - start
    finally:
        sampler_module.sjdpp_step = original_step
        if runtime is not None:
            sampler_module.StepNoise.sample_per_request = original_noise
    per_step = {key: 1e3 * value / steps["n"] for key, value in timers.seconds.items()}
    per_step["whole step"] = 1e3 * wall / steps["n"]
    per_step["steps"] = steps["n"]
    return per_step


def markdown(plain: dict, sjdpp: dict, label: str) -> str:
    lines = [f"| ms per engine step | plain | SJD++, {label} |", "|---|---:|---:|"]
    row = lambda name, a, b: lines.append(f"| {name} | {a} | {b} |")  # noqa: E731
    fmt = lambda d, key: f"{d[key]:.2f}" if key in d else "—"  # noqa: E731
    row("whole step", fmt(plain, "whole step"), fmt(sjdpp, "whole step"))
    for key, name in RUNNER_ROWS:
        row(name, fmt(plain, key), fmt(sjdpp, key))
        if key == "sample_tokens":
            for inner, inner_name in SAMPLER_ROWS:
                row(f"&nbsp;&nbsp;of which {inner_name}", "—", fmt(sjdpp, inner))
    for key, name in SCHEDULER_ROWS:
        row(name, fmt(plain, key), fmt(sjdpp, key))
    row("steps timed", plain["steps"], sjdpp["steps"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from vllm import LLM

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--budget", default="null", help='null (full windows), a number, or "auto"')
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--compiled", action="store_true", help="compile the forward, as vllm serve does")
    ap.add_argument("--dense-race", action="store_true", help="race keyed rows over their whole rows (to compare)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/step_breakdown.json"))
    args = ap.parse_args(argv)
    started = provenance()
    if args.dense_race:
        from vllm_sjdpp.kernels import keyed_race

        keyed_race.MAX_SUPPORT = 0.0  # every keyed race falls back to the dense one
    budget = None if args.budget == "null" else args.budget if args.budget == "auto" else int(args.budget)

    engine = dict(enforce_eager=not args.compiled, max_model_len=GENERATED_LENGTH + 64, seed=0, disable_log_stats=False,
                  max_num_seqs=64)
    results = {}
    for name, spec in (("plain", None), ("sjdpp", {"method": "sjdpp", "num_speculative_tokens": 32,
                                                      "draft_token_budget": budget})):
        llm = LLM(str(DEFAULT_OUT), speculative_config=spec, **engine)
        results[name] = measure(llm, args.concurrency, args.seconds)
        del llm
    label = "full windows" if budget is None else f"budget {budget}"
    table = markdown(results["plain"], results["sjdpp"], label)
    print(f"\n{args.concurrency} concurrent images, k = 32, {args.seconds:.0f} s each, "
          f"{'compiled' if args.compiled else 'eager'}{', the dense race' if args.dense_race else ''}\n")
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"concurrency": args.concurrency, "budget": budget, "window": 32,
                                    "compiled": args.compiled, "dense_race": args.dense_race,
                                    "seconds": args.seconds, "ms_per_step": results, "provenance": started},
                                   indent=1))
    args.out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
