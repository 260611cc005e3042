"""The first thing to run on a GPU: is this install right, and what does SJD++ buy here?

    bash benchmarks/gpu_smoke.sh            (or: .venv/bin/python benchmarks/gpu_smoke.py [--quick])

Serves the bundled digit model with `--speculative-config sjdpp` and the images endpoint, in
turn: with vLLM's default compilation and CUDA graphs, with `--enforce-eager`, and with
`--max-num-batched-tokens` 8 and 2048 (chunked prefill and small passes against large ones);
then the compiled server once more over the first one's compile cache (a restart: vLLM loads
its AOT-compiled forward, whose guidance inputs must still be the live ones; on CUDA its log must
say it loaded); then without `--speculative-config`, which must stay on vLLM's V1 model runner
(on CUDA its log says so) and give the same tokens for a seed.
On each server:
- greedy and seeded tokens of "a handwritten 0" ... "a handwritten 9" through the completions
  endpoint, with SJD++ and with `sjdpp_disable`: SJD++ must give plain decoding's tokens on every
  server (a seed names one image), and the compiled servers must agree whatever
  --max-num-batched-tokens; compiled against eager is printed, not required (a compiled forward
  rounds differently: on CPU 7/10 greedy and 0/10 seeded images matched);
- forward passes per image (from the images endpoint's answers), latency one image at a time,
  and throughput with 16 images in flight, SJD++ against plain decoding.
Prints one table, writes it with the failures and the run's provenance to summary.json beside
the servers' logs (a temporary folder; the path is printed), and exits non-zero if any tokens
differ.  Works on CPU too (slowly; there the "compiled" server is vLLM's CPU default, which
traces once and captures no graphs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from vllm_sjdpp.provenance import provenance
from vllm_sjdpp.digits.tokens import GENERATED_LENGTH, prompt_ids
from vllm_sjdpp.digits.train import DEFAULT_OUT
from vllm_sjdpp.serving.server import vllm_server

MODEL = str(DEFAULT_OUT)
BASE_ARGS = ["--max-model-len", str(GENERATED_LENGTH + 64), "--max-num-seqs", "32"]
SJDPP = ["--speculative-config", "sjdpp"]
NO_SJDPP = "no --speculative-config"
RESTARTED = "compiled, restarted"
SERVERS = {
    "compiled + graphs": SJDPP,
    "--enforce-eager": SJDPP + ["--enforce-eager"],
    # vLLM wants max_num_batched_tokens >= max_num_seqs.
    "--max-num-batched-tokens 8": SJDPP + ["--max-num-batched-tokens", "8", "--max-num-seqs", "8"],
    "--max-num-batched-tokens 2048": SJDPP + ["--max-num-batched-tokens", "2048"],
    RESTARTED: SJDPP,
    # A plain guided server: on CUDA vLLM would pick Model Runner V2 for it, which the plugin keeps
    # it from (patches/vllm_config.py); its seeded tokens must be the SJD++ servers' (both of its
    # "modes" decode plainly).
    NO_SJDPP: [],
}
# What vLLM logs when it keeps a guided model on V1 where it would have picked V2 (CUDA only).
KEPT_ON_V1 = "vllm-sjdpp's guided architecture"
# Servers sharing one compile cache: the second starts from what the first compiled.
SHARED_CACHE = ("compiled + graphs", RESTARTED)
# What vLLM logs when it starts from an AOT-compiled forward (vllm/compilation/decorators.py).
LOADED_AOT = "Directly load AOT compilation"


def completions_tokens(base: str, seed: int | None, plain: bool) -> list[list[int]]:
    import httpx

    def one(digit: int) -> list[int]:
        body = {"model": MODEL, "prompt": prompt_ids(digit), "max_tokens": GENERATED_LENGTH, "ignore_eos": True,
                "return_token_ids": True, "vllm_xargs": {"sjdpp_disable": plain}}
        body.update({"temperature": 0} if seed is None else {"seed": seed + digit})
        r = httpx.post(base + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["choices"][0]["token_ids"]

    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        return list(pool.map(one, range(10)))


def timed_images(base: str, plain: bool, concurrency: int, count: int) -> tuple[float, float, float]:
    """(forward passes per image, mean latency s, images per second)."""
    from openai import OpenAI

    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=600)

    def one(i: int) -> tuple[int, float]:
        start = time.perf_counter()
        out = client.images.generate(model=MODEL, prompt=f"a handwritten {i % 10}",
                                     extra_body={"seed": 100 + i, "sjdpp_disable": plain})
        return out.data[0].model_extra["sjdpp"]["forward_passes"], time.perf_counter() - start

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(count)))
    wall = time.perf_counter() - start
    return sum(p for p, _ in results) / count, sum(t for _, t in results) / count, count / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed images (a check, not a measurement)")
    args = ap.parse_args()
    started = provenance()
    one_count, many_count = (3, 16) if args.quick else (10, 64)
    logs = Path(tempfile.mkdtemp(prefix="sjdpp-gpu-smoke-"))
    tokens, rows, failures, notes = {}, [], [], []
    for name, extra in SERVERS.items():
        log = logs / (name.strip("-").replace(" ", "_").replace("+", "and") + ".log")
        print(f"serving {name} (log: {log}) ...", flush=True)
        env = {"VLLM_PLUGINS": "sjdpp,sjdpp_images"}
        if name in SHARED_CACHE:
            env["VLLM_CACHE_ROOT"] = str(logs / "compile-cache")
        try:
            with vllm_server(MODEL, BASE_ARGS + extra, log, env=env, timeout_s=900) as base:
                tokens[name] = {
                    (kind, plain): completions_tokens(base, seed, plain)
                    for kind, seed in (("greedy", None), ("seeded", 0)) for plain in (True, False)
                }
                for plain in (True, False):
                    passes, latency, _ = timed_images(base, plain, 1, one_count)
                    _, _, throughput = timed_images(base, plain, 16, many_count)
                    rows.append((name, "plain" if plain else "SJD++", passes, latency, throughput))
            if name == NO_SJDPP and torch.cuda.is_available() and KEPT_ON_V1 not in log.read_text(errors="replace"):
                failures.append(f"{name}: the log does not say the guided model was kept on the V1 runner (log: {log})")
            if name == RESTARTED and LOADED_AOT not in log.read_text(errors="replace"):
                # vLLM 0.32 on CPU cannot load its own AOT artifacts (it compiles again), so
                # there the restart proves nothing more than the first start.
                message = f"{name}: the server compiled again instead of loading its AOT artifact (log: {log})"
                (failures if torch.cuda.is_available() else notes).append(message)
        except RuntimeError as e:  # a server that does not start: reported, the others still run
            failures.append(f"{name}: {str(e).splitlines()[0]} (log: {log})")
            print(f"  {failures[-1]}", flush=True)
    # A compiled forward rounds differently from an eager one, so each is its own reference: every
    # compiled server against the default one, and SJD++ against plain decoding on each server.
    compiled = "compiled + graphs"
    for name, got in tokens.items():
        ref_name = name if name == "--enforce-eager" or compiled not in tokens else compiled
        for (kind, plain), outputs in got.items():
            same = sum(a == b for a, b in zip(outputs, tokens[ref_name][(kind, True)]))
            if same != 10:
                where = "this server" if ref_name == name else "the default compiled server"
                failures.append(f"{name}, {kind}, {'plain' if plain else 'SJD++'}: {same}/10 images equal plain decoding on {where}")
    if compiled in tokens and "--enforce-eager" in tokens:
        across = {kind: sum(a == b for a, b in zip(tokens[compiled][(kind, True)], tokens["--enforce-eager"][(kind, True)]))
                  for kind in ("greedy", "seeded")}
        print(f"\ncompiled against eager (informational: compilation changes float rounding, so tokens may part): "
              f"greedy {across['greedy']}/10, seeded {across['seeded']}/10 images equal")
    print(f"\n{'server':<30} {'mode':<6} {'passes/image':>12} {'latency s (1)':>14} {'images/s (16)':>14}")
    for name, mode, passes, latency, throughput in rows:
        print(f"{name:<30} {mode:<6} {passes:>12.1f} {latency:>14.3f} {throughput:>14.2f}")
    for i in range(0, len(rows), 2):
        plain, sjdpp = rows[i], rows[i + 1]
        print(f"{plain[0]:<30} SJD++ against plain: {plain[2] / sjdpp[2]:.2f}x fewer passes, "
              f"{plain[3] / sjdpp[3]:.2f}x lower latency at 1, {sjdpp[4] / plain[4]:.2f}x throughput at 16")
    for note in notes:
        print(f"note: {note}")
    summary = {"rows": rows, "failures": failures, "notes": notes, "provenance": started}
    (logs / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"wrote {logs / 'summary.json'}")
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\ntokens: SJD++ equals plain decoding on every server, and the compiled servers agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
