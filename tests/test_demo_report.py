"""The demo's report (vllm_sjdpp.digits.demo.report): every figure it prints comes from the runs it
is given, and it says plainly where drafting cannot pay."""

import concurrent.futures
import threading
import time

import numpy as np
import pytest

from vllm_sjdpp.bench import in_flight
from sim_engine import PROFILES, WINDOW, Clock, run

from vllm_sjdpp.digits.demo import BatchCosts, Generation, Machine, Run, controller_costs, report
from vllm_sjdpp.engine.goodput import GoodputController


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


COSTS = BatchCosts(10, {9: 0.011, 10: 0.012}, {20: 0.018, 30: 0.02}, {1: 0.29, 14: 2.4})


def test_says_what_the_controller_measured_where_it_drafted_little():
    (one, many), full = runs(full_pass_cost=1.85)
    say = lambda drafted, costs: "\n".join(report([one, many], full, 32, MACHINE, drafted, True, costs))  # noqa: E731
    assert ("The controller drafted little at 10 in flight: it measured a pass of its 10 requests at 0.012 s without "
            "drafts and a drafted one of 20 positions at 0.018 s (1.5x), and windows of 1 draft accepted 0.29 drafts "
            "on average; so SJD++ ran nearly as plain decoding does.") in say({1: 14.2, 10: 0.1}, COSTS)
    no_short_windows = BatchCosts(10, {9: 0.011}, {40: 0.024}, {11: 1.4})
    assert ("pass of its 10 requests at 0.011 s without drafts and a drafted one of 40 positions at 0.024 s (2.2x), "
            "and windows of 11 drafts accepted 1.4 drafts on average;") in say({1: 14.2, 10: 0.1}, no_short_windows)
    assert "accepted" not in say({10: 0.1}, BatchCosts(10, {10: 0.01}, {20: 0.02}, {})).split("drafted little")[1]
    for drafted, costs in (({1: 14.2, 10: 1.0}, COSTS), ({1: 14.2, 10: 0.1}, None), ({1: 14.2}, COSTS)):
        assert "drafted little" not in say(drafted, costs)  # drafting, no controller, or no such load


def test_reads_the_controllers_log_line(tmp_path):
    """`controller_costs` reads what `GoodputController.summary` writes (the runtime's periodic
    log line), at the batch size asked for, the last line there that measured both curves: a
    controller run for 300 steps at 10 requests of the simulated engine (cpu-fp32 profile), its
    summary in a log after an older line at 10 requests and one at another batch size, and before
    a line at 10 requests with no drafted pass timed and a line cut short."""
    controller = GoodputController(WINDOW, clock=Clock())
    run(PROFILES[0], 10, 300, 0, controller=controller)
    prefix = "(Worker pid=1) INFO 12-07 18:14:52 [runtime.py:74] SJD++: 2718 request-steps, ...; state: 1 requests; "
    log = tmp_path / "vllm-serve-0.log"
    log.write_text("\n".join([
        prefix + "pass s by positions at 10 requests, no drafts: 10: 0.5; with drafts: 20: 0.7; "
                 "drafts accepted by window length: 3: 0.9; cap 3",
        prefix + "pass s by positions at 1 requests, no drafts: 1: 0.0064; with drafts: 2: 0.011, 33: 0.017; "
                 "drafts accepted by window length: 11: 1.4, 32: 1.9; cap 17",
        prefix + controller.summary(),
        prefix + "pass s by positions at 10 requests, no drafts: 10: 0.01; with drafts: not measured yet; drafts "
                 "accepted by window length: not measured yet; cap 0",
        prefix + "pass s by positions at 10 requests, no drafts: 10: 0.01; with drafts: 20: ; "
                 "drafts accepted by window length: 1: 0.3; cap 0",
    ]) + "\n")
    costs = controller_costs(log, 10)
    assert costs.plain and costs.drafted and costs.accepted
    for measured, drafted in ((costs.plain, False), (costs.drafted, True)):
        xs, ys = controller.cost.curve(10, drafted).points()
        assert [float(f"{y:.2g}") for x, y in zip(xs, ys) if round(x) in measured] == list(measured.values())
    lengths, means = controller.acceptance.means()
    assert [float(f"{m:.2g}") for L, m in zip(lengths.tolist(), means) if L in costs.accepted] == list(costs.accepted.values())
    assert controller_costs(log, 3) is None


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
    waits (at most 1 s) for request 10 to start, the others take 50 ms (at 10 ms, ten threads
    did not all start before the first ended on 2 cores busy with another run): with `in_flight`
    request 10 starts within milliseconds; a load in rounds of ten (the broken variant,
    `rounds_of`) starts it only after request 0 has given up waiting."""
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
            time.sleep(0.05)
        with lock:
            running[0] -= 1
        return i

    assert (rounds_of if broken else in_flight)(request, 30, 10) == list(range(30))
    assert most[0] == 10
    assert saw_request_10 == [not broken]
