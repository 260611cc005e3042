"""The demo's report (vllm_sjdpp.digits.demo.report): every figure it prints comes from the runs it
is given, and it says plainly where drafting cannot pay."""

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from vllm_sjdpp.bench import in_flight
from vllm_sjdpp.digits.demo import Generation, Machine, Run, report


def gens(passes: float, seconds: float, png: str = "a") -> list[Generation]:
    return [Generation(d, np.zeros((2, 2)), passes, seconds, f"{png}{d}") for d in range(10)]


def runs(full_pass_cost: float, full_passes: float = 91.0, auto_passes: float = 150.0, same: bool = True):
    plain = gens(273, 0.9)  # 3.3 ms per pass
    second = "a" if same else "b"
    one = Run(1, plain, gens(auto_passes, 0.9 * auto_passes / 273 * 1.2, second), 9.0, 6.0)
    many = Run(10, gens(273, 1.5), gens(260, 1.45), 4.5, 4.4, [(2.0, 2.2), (2.5, 2.2)])
    full = Run(1, plain, gens(full_passes, 0.9 / 273 * full_pass_cost * full_passes), 9.0, 9.0)
    return [one, many], full


MACHINE = Machine("AMD EPYC 7B13", False, "float32")


def test_figures_come_from_the_runs():
    (one, many), full = runs(full_pass_cost=1.85)
    text = "\n".join(report([one, many], full, 32, MACHINE, {1: 7.25, 10: 0.5}, True))
    assert "AMD EPYC 7B13 (no native bf16), the model in float32" in text
    assert "Full windows (k = 32): 3.00 tokens per pass, 3.00x fewer forward passes" in text
    assert "cost 1.85x a plain one, so full windows would give 1.62x lower latency" in text
    assert "1.82x fewer forward passes" in text and "drafted 7.2 tokens per pass" in text
    assert "drafted 0.5 tokens per request-pass" in text
    assert "Round by round: 0.91x, 1.14x" in text
    assert "cannot pay" not in text
    assert "every image here; the server's seed probe found a position's logits bit-identical" in text


@pytest.mark.parametrize("cost", [3.0, 4.8])
def test_says_when_drafting_cannot_pay(cost):
    (one, many), full = runs(full_pass_cost=cost)
    text = "\n".join(report([one, many], full, 32, MACHINE, {1: 0.0, 10: 0.0}, False))
    assert f"Drafting cannot pay on this machine: a drafted pass costs {cost:.2f}x a plain one and commits 3.00" in text
    assert "logits that depend on the shape of the pass" in text


def test_one_round_gives_no_round_by_round_line():
    (one, many), full = runs(full_pass_cost=1.85)
    many.round_walls = [(4.5, 4.4)]
    assert "Round by round" not in "\n".join(report([one, many], full, 32, MACHINE, {}, True))


def test_different_images_are_reported():
    (one, many), full = runs(full_pass_cost=1.5, same=False)
    assert "NOT every image here" in "\n".join(report([one, many], full, 32, MACHINE, {}, None))


def rounds_of(request, count: int, concurrency: int) -> list:
    """Broken load: rounds of `concurrency` requests, each round awaited whole."""
    out = []
    for first in range(0, count, concurrency):
        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            out += pool.map(request, range(first, min(first + concurrency, count)))
    return out


@pytest.mark.parametrize("broken", [False, True], ids=["in_flight", "rounds"])
def test_ten_in_flight_means_a_new_request_as_one_ends(broken):
    """`in_flight` keeps `concurrency` requests running until the last ones: request 10 starts as
    soon as any of 0 .. 9 ends, not once all ten have (the demo's throughput load).  Request 0
    waits (at most 1 s) for request 10 to start, the others take 10 ms: with `in_flight` request
    10 starts within milliseconds; a load in rounds of ten (the broken variant, `rounds_of`)
    starts it only after request 0 has given up waiting."""
    lock, running, most, started = threading.Lock(), [0], [0], threading.Event()
    saw_request_10 = []

    def request(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if i == 10:
            started.set()
        if i == 0:
            saw_request_10.append(started.wait(timeout=1.0))
        else:
            time.sleep(0.01)
        with lock:
            running[0] -= 1
        return i

    assert (rounds_of if broken else in_flight)(request, 30, 10) == list(range(30))
    assert most[0] == 10
    assert saw_request_10 == [not broken]
