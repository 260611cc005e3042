"""Soak: `vllm serve --speculative-config sjdpp` under steady load with random aborts, watching
the server's resident memory and the plugin's Jacobi state over time; both must stay bounded.

    python -m vllm_sjdpp.digits.soak [--minutes 10] [--concurrency 32] [--abort-fraction 0.1]
                                    [--model DIR] [--out benchmarks/results/soak]

Each of `concurrency` clients streams one image request after another from the bundled digit
model (guided, SJD++ defaults); a fraction of them hang up after a random number of chunks.
Every few seconds the resident memory of the server's processes is sampled (psutil), and the
plugin's periodic log line gives the Jacobi state it holds (requests, MiB of q rows).  Writes
JSON and a plot; the verdict compares the second half of the run with the first.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import threading
import time
from pathlib import Path

STATE_LINE = re.compile(r"state: (\d+) requests, ([\d.]+) MiB of q rows")


def server_processes(port: int):
    """The `vllm serve` process listening on `port` and its children (API server, engine core)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and str(port) in cmd:
            return [proc, *proc.children(recursive=True)]
    raise RuntimeError(f"no vllm serve process on port {port}")


def rss_mib(processes) -> dict[str, float]:
    """Resident MiB per process (by name, e.g. the API server and VLLM::EngineCore)."""
    import psutil

    out: dict[str, float] = {}
    for proc in processes:
        try:
            name = f"{proc.name()}[{proc.pid}]"
            out[name] = round(proc.memory_info().rss / 2**20, 1)
        except psutil.NoSuchProcess:
            pass
    return out


def client_loop(base: str, model: str, prompt, max_tokens: int, abort_fraction: float, stop: threading.Event,
                counts: dict, seed: int) -> None:
    import httpx

    rng = random.Random(seed)
    with httpx.Client(base_url=base, timeout=600) as client:
        while not stop.is_set():
            abort_after = rng.randint(1, max(2, max_tokens // 4)) if rng.random() < abort_fraction else None
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                    "seed": rng.randrange(2**31), "ignore_eos": True, "return_token_ids": True}
            chunks = 0
            with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    counts["errors"] += 1
                    continue
                for line in response.iter_lines():
                    chunks += line.startswith("data: {")
                    if abort_after is not None and chunks >= abort_after:
                        break  # closing the stream aborts the request in vLLM
            counts["aborted" if abort_after is not None and chunks >= abort_after else "completed"] += 1


def soak(base: str, model: str, log_path: Path, minutes: float, concurrency: int, abort_fraction: float,
         prompt, max_tokens: int, sample_every_s: float = 5.0, progress=None) -> dict:
    """Run the load; returns the samples: [seconds, RSS MiB, Jacobi requests, q-row MiB]."""
    port = int(base.rsplit(":", 1)[1])
    processes = server_processes(port)
    stop = threading.Event()
    counts = {"completed": 0, "aborted": 0, "errors": 0}
    threads = [
        threading.Thread(target=client_loop, args=(base, model, prompt, max_tokens, abort_fraction, stop, counts, i),
                         daemon=True)
        for i in range(concurrency)
    ]
    for t in threads:
        t.start()
    samples, per_process, start = [], [], time.monotonic()
    try:
        while time.monotonic() - start < minutes * 60:
            time.sleep(sample_every_s)
            states = STATE_LINE.findall(Path(log_path).read_text(errors="replace"))
            requests, q_mib = (int(states[-1][0]), float(states[-1][1])) if states else (0, 0.0)
            rss = rss_mib(processes)
            per_process.append(rss)
            samples.append([round(time.monotonic() - start, 1), round(sum(rss.values()), 1), requests, q_mib])
            if progress is not None:
                progress.update(sample_every_s)
                progress.set_postfix(rss=f"{samples[-1][1]:.0f}MiB", state=requests, **counts)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    return {"samples": samples, "rss_per_process_mib": per_process, "counts": counts, "concurrency": concurrency,
            "abort_fraction": abort_fraction, "minutes": minutes}


def verdict(result: dict) -> dict:
    """Bounded: the second half's peak RSS within 5% (or 64 MiB) of the first half's, and the
    Jacobi state never more requests than the clients."""
    import numpy as np

    samples = result["samples"]
    half = len(samples) // 2
    first, second = max(s[1] for s in samples[: max(half, 1)]), max(s[1] for s in samples[half:])
    late = np.array(samples[half:], dtype=float)
    slope = float(np.polyfit(late[:, 0] / 60, late[:, 1], 1)[0]) if len(late) > 1 else 0.0
    return {
        "rss_first_half_peak_mib": first,
        "rss_second_half_peak_mib": second,
        "rss_second_half_slope_mib_per_min": round(slope, 2),
        "rss_bounded": second <= max(first * 1.05, first + 64),
        "max_jacobi_requests": max(s[2] for s in samples),
        "state_bounded": max(s[2] for s in samples) <= result["concurrency"],
        "max_q_rows_mib": max(s[3] for s in samples),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, rss, req, q = zip(*result["samples"])
    minutes = [x / 60 for x in t]
    fig, (a, b) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    a.plot(minutes, rss)
    a.set_ylabel("server RSS (MiB)")
    a.set_ylim(0, max(rss) * 1.15)
    a.set_title(f"soak: {result['concurrency']} clients, {result['abort_fraction']:.0%} aborting; "
                f"{result['counts']['completed']} completed, {result['counts']['aborted']} aborted")
    lines = b.plot(minutes, req, label="Jacobi states (requests)")
    b.set_ylabel("requests")
    b.set_ylim(0, result["concurrency"] * 1.3)
    b2 = b.twinx()
    lines += b2.plot(minutes, q, color="tab:orange", label="q rows (MiB)")
    b2.set_ylabel("q rows (MiB)")
    b2.set_ylim(0, max(max(q) * 1.3, 1))
    b.set_xlabel("minutes")
    b.legend(lines, [line.get_label() for line in lines], loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parser(default_model: Path | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m vllm_sjdpp.digits.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10, help="how long to keep the server busy (default: %(default)s)")
    ap.add_argument("--concurrency", type=int, default=32, help="requests in flight (default: %(default)s)")
    ap.add_argument("--abort-fraction", type=float, default=0.1,
                    help="share of requests the client abandons mid-way (default: %(default)s)")
    ap.add_argument("--model", type=Path, default=default_model, help="the digit model's folder (default: the bundled one)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"),
                    help="results prefix: .json and .png are written (default: %(default)s)")
    return ap


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, prompt_ids
    from vllm_sjdpp.digits.train import DEFAULT_OUT
    from vllm_sjdpp.provenance import provenance
    from vllm_sjdpp.serving.server import vllm_server

    args = parser(DEFAULT_OUT).parse_args(argv)
    started = provenance()
    log_path = Path(tempfile.mkdtemp(prefix="sjdpp-soak-")) / "vllm-serve.log"
    serve_args = ["--speculative-config", "sjdpp", "--max-model-len", str(GENERATED_LENGTH + 64),
                  "--max-num-seqs", str(args.concurrency)]
    print(f"vllm serve {args.model} (log: {log_path})")
    with vllm_server(args.model, serve_args, log_path, env={"SJDPP_LOG_INTERVAL_S": "2"}) as base:
        with tqdm(total=args.minutes * 60, unit="s", desc="soak") as bar:
            result = soak(base, str(args.model), log_path, args.minutes, args.concurrency, args.abort_fraction,
                          prompt_ids(7), GENERATED_LENGTH, progress=bar)
    result["verdict"] = verdict(result)
    result["provenance"] = started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({**result["verdict"], **result["counts"]}, indent=1))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
