"""The command lines a user runs: `--help` that helps and does nothing else, the client's options,
progress and errors, and the bench's figures.  No model or server: the client talks to a stdlib
HTTP server that speaks the completions API's streaming, the bench's arithmetic is checked on
runs made up here (tests/test_images_api.py runs the bench against `vllm serve`)."""

from __future__ import annotations

import contextlib
import importlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_request_values import PROMPT_IDS, TOKENS, FakeFamily
from vllm_sjdpp import bench
from vllm_sjdpp.guidance.cfg import NEGATIVE_PROMPT_KEY, SCALE_KEY
from vllm_sjdpp.serving import client as image_client

# Every `python -m` entry point, and the function its run would start with (made to fail here,
# so that a --help that runs anything is caught).
CLIS = {
    "vllm_sjdpp.cpu_alias": "install",
    "vllm_sjdpp.kernels.compile_check": "coverage_errors",
    "vllm_sjdpp.digits.demo": "measure",
    "vllm_sjdpp.digits.soak": "soak",
    "vllm_sjdpp.digits.train": "train",
    "vllm_sjdpp.digits.twin": "widen",
    "vllm_sjdpp.serving.client": "generate_images",
    "vllm_sjdpp.bench": "bench",
}


@pytest.mark.parametrize("module", sorted(CLIS))
def test_help_documents_every_option_and_does_nothing_else(module, monkeypatch, capsys):
    mod = importlib.import_module(module)
    work = CLIS[module]
    assert hasattr(mod, work), f"{module}.{work}: the test's guard names no function"
    monkeypatch.setattr(mod, work, lambda *a, **k: pytest.fail(f"--help ran {module}.{work}"))
    for action in mod.parser()._actions:
        assert action.help and action.help.strip(), f"{module}: {action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith(f"usage: python -m {module}")


# The client, against a fake completions server ------------------------------------------------

class FakeCompletions(BaseHTTPRequestHandler):
    """POST /v1/completions: streams each choice's tokens in chunks of 2 (vLLM's
    `return_token_ids` deltas); a request with seed 13 gets a 400 in OpenAI's shape, one with
    seed 14 its refusal inside the stream, as vLLM answers a streamed request it refuses."""

    bodies: list[dict] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeCompletions.bodies.append(body)
        if body.get("seed") == 13:
            error = {"error": {"message": "top_k must be -1 or at least 1", "type": "BadRequestError",
                               "param": "top_k", "code": 400}}
            data = json.dumps(error).encode()
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if body.get("seed") == 14:  # vLLM refuses a streamed request inside the stream
            error = {"error": {"message": "the prompt (76 tokens) and one image (16 tokens) do not fit",
                               "type": "BadRequestError", "param": "prompt", "code": 400}}
            self.wfile.write(f"data: {json.dumps(error)}\n\n".encode())
            return
        for start in range(0, body["max_tokens"], 2):  # the choices interleaved, as vLLM streams them
            for index in reversed(range(body["n"])):
                tokens = [100 * (index + 1) + t for t in range(body["max_tokens"])]
                last = start + 2 >= len(tokens)
                choice = {"index": index, "text": "", "token_ids": tokens[start:start + 2],
                          "finish_reason": "length" if last else None, "logprobs": None}
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": body["model"], "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")


@contextlib.contextmanager
def fake_server():
    FakeCompletions.bodies = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeCompletions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()


@pytest.fixture
def family(monkeypatch):
    fake = FakeFamily()
    fake.default_negative_prompt = None
    monkeypatch.setattr(image_client.families, "load", lambda folder: fake)
    return fake


def test_client_streams_every_choice_in_order(family):
    with fake_server() as url:
        images = image_client.generate_images(url, "m", "folder", ["a 1", "a 2"], n=2, seed=3, temperature=0.5,
                                              top_k=None, progress=False)
    assert [g.prompt for g in images] == ["a 1", "a 1", "a 2", "a 2"]
    assert [g.token_ids for g in images[:2]] == [[100 + t for t in range(TOKENS)], [200 + t for t in range(TOKENS)]]
    body = FakeCompletions.bodies[0]
    assert body["stream"] is True and body["return_token_ids"] is True and body["temperature"] == 0.5
    assert "top_k" not in body  # an option not given is the server's default, not null


def test_client_options_reach_the_request(family, tmp_path):
    with fake_server() as url:
        image_client.main(["--url", url, "--model", "m", "--out", str(tmp_path / "x.png"), "--no-progress", "--size", "32x32",
                           "--negative-prompt", "blurry", "--guidance-scale", "0", "--seed", "0", "--top-p", "0.9",
                           "a 1"])
    body = FakeCompletions.bodies[0]
    assert body["seed"] == 0 and body["top_p"] == 0.9 and body["prompt"] == PROMPT_IDS
    assert body["vllm_xargs"] == {SCALE_KEY: 0, NEGATIVE_PROMPT_KEY: PROMPT_IDS}


def test_client_errors_are_one_line_without_a_traceback(family, capsys, tmp_path):
    with fake_server() as url:
        with pytest.raises(SystemExit) as refused:
            image_client.main(["--url", url, "--model", "m", "--seed", "13", "--no-progress", "a 1"])
        with pytest.raises(SystemExit) as streamed:
            image_client.main(["--url", url, "--model", "m", "--seed", "14", "--no-progress", "a 1"])
    assert str(refused.value) == ("error: the server refused the request (400): top_k must be -1 or at least 1 "
                                  "(parameter top_k)")
    assert str(streamed.value) == ("error: the server refused the request: the prompt (76 tokens) and one image "
                                   "(16 tokens) do not fit (parameter prompt)")
    with pytest.raises(SystemExit) as size:
        image_client.main(["--url", url, "--model", "m", "--size", "64x64", "--no-progress", "a 1"])
    assert "size '64x64'" in str(size.value) and str(size.value).startswith("error: ")
    with pytest.raises(SystemExit) as nobody:  # the fake server is gone
        image_client.main(["--url", url, "--model", "m", "--no-progress", "a 1"])
    assert str(nobody.value) == f"error: no server answers at {url} (is `vllm serve` running there?)"


def test_client_refuses_a_folder_no_family_reads(tmp_path):
    with pytest.raises(SystemExit) as e:
        image_client.main(["--url", "http://127.0.0.1:9", "--model", str(tmp_path), "--no-progress", "a 1"])
    assert str(e.value) == f"error: {tmp_path}: no config.json (not a model folder)"


# The bench's figures ------------------------------------------------------------------------

def _run(mode, seed, seconds, passes, png="same", identical=True):
    return bench.ImageRun(mode, seed, seconds, passes, 100, f"{png}-{seed}", identical)


def test_bench_figures_from_its_runs():
    latency = [_run("plain", 0, 2.0, 100), _run("sjdpp", 0, 1.0, 40), _run("sjdpp", 1, 1.2, 30),
               _run("plain", 1, 2.2, 100), _run("plain", 2, 9.0, 100), _run("sjdpp", 2, 1.1, 50)]
    batch = {"plain": ([_run("plain", s, 0, 100) for s in range(4)], 8.0),
             "sjdpp": ([_run("sjdpp", s, 0, 60) for s in range(4)], 5.0)}
    s = bench.summarize(latency, batch)
    assert s["passes_per_image"] == {"plain": 100, "sjdpp": pytest.approx(40)}  # one at a time: 40, 30, 50
    assert s["passes_per_image_in_flight"] == {"plain": 100, "sjdpp": 60}  # fewer drafts under load
    assert s["latency_s"] == {"plain": 2.2, "sjdpp": 1.1} and s["lower_latency"] == pytest.approx(2.0)
    assert s["throughput"] == pytest.approx((4 / 5) / (4 / 8))
    assert (s["identical_pngs"], s["seeds_compared"], s["server_seed_identical"]) == (4, 4, True)
    assert "| forward passes per image, 1 at a time | 100.0 | 40.0 | 2.50x fewer |" in bench.table(s, 4)
    assert "| forward passes per image, 4 in flight | 100.0 | 60.0 | 1.67x fewer |" in bench.table(s, 4)


def test_bench_catches_a_seed_whose_png_changes_with_sjdpp():
    latency = [_run("plain", 0, 1, 100), _run("sjdpp", 0, 1, 40, png="other"), _run("plain", 1, 1, 100),
               _run("sjdpp", 1, 1, 40), _run("plain", 2, 1, 100), _run("sjdpp", 2, 1, 40)]
    batch = {"plain": ([_run("plain", 1, 0, 100), _run("plain", 2, 0, 100, png="b")], 1.0),
             "sjdpp": ([_run("sjdpp", 1, 0, 40, png="again"), _run("sjdpp", 2, 0, 40, png="c")], 1.0)}
    s = bench.summarize(latency, batch)
    # seed 0 differs across modes; seed 1's SJD++ PNG and both of seed 2's change in the batch
    assert (s["identical_pngs"], s["seeds_compared"], s["unrepeatable_seeds"]) == (0, 1, 2)
    assert "2 seed(s) gave two PNGs in one mode" in bench.table(s, 2)


def test_bench_alternates_the_modes_abba_and_sums_each_mode_s_round_walls(monkeypatch):
    """Throughput rounds go plain, SJD++ | SJD++, plain | SJD++, plain | plain, SJD++ (a drift
    linear in time falls on both modes), and a mode's throughput is its images over its rounds'
    summed walls.  Made-up rounds: the machine slows by 1 s a round, and SJD++ takes 3/4 of
    plain's time; all plain, then all SJD++ would report 0.51x instead of the 1.33x ABBA gives."""
    order, clock = [], iter(range(100))

    def run_in_flight(http, url, body, mode, seeds, concurrency):
        assert (len(seeds), concurrency) == (6, 2)  # three waves of two in flight
        order.append(mode)
        slow = 1.0 + next(clock)  # this round's machine speed: later rounds are slower
        return [_run(mode, s, 0, 100 if mode == "plain" else 40) for s in seeds], slow * (1.0 if mode == "plain" else 0.75)

    monkeypatch.setattr(bench, "run_in_flight", run_in_flight)
    monkeypatch.setattr(bench, "request_image", lambda http, url, body, mode, seed: _run(mode, seed, 1.0, 100))
    record = bench.bench("http://127.0.0.1:9", {"prompt": "x"}, images=1, in_flight=2, seed=0, rounds=4,
                         progress=False)
    assert order == ["plain", "sjdpp", "sjdpp", "plain", "sjdpp", "plain", "plain", "sjdpp"]
    walls = record["throughput_runs"]
    assert walls["plain"]["round_walls_s"] == [1, 4, 6, 7] and walls["sjdpp"]["round_walls_s"] == [1.5, 2.25, 3.75, 6]
    assert record["summary"]["throughput"] == pytest.approx(18 / 13.5)
    assert [bench.abba(r) for r in range(5)] == [("plain", "sjdpp"), ("sjdpp", "plain"), ("sjdpp", "plain"),
                                                  ("plain", "sjdpp"), ("plain", "sjdpp")]


@pytest.mark.parametrize("n", [4, 6, 7, 8])
def test_benchmark_rounds_are_balanced_over_places_and_predecessors(n):
    """benchmarks/bench_auto.py's modes (four, and 4 + B with `--budgets`): over n rounds each
    mode runs once in each place and, for an even n, right after each other mode once (a
    Williams design)."""
    modes = ("plain", "auto", "full", "none", "budget20", "budget40", "budget80", "budget160")[:n]
    rounds = [bench.williams_order(r, modes) for r in range(n)]
    assert all(sorted(row) == sorted(modes) for row in rounds)
    assert all(sorted(row[i] for row in rounds) == sorted(modes) for i in range(n))
    follows = [(row[i], row[i + 1]) for row in rounds for i in range(n - 1)]
    assert n % 2 or len(set(follows)) == len(follows) == n * (n - 1)


def test_bench_auto_budgets_are_whole_numbers_above_0():
    """`benchmarks/bench_auto.py --budgets`: each budget a mode of its own, each once; anything
    but whole numbers >= 1 is refused naming the option (no drafts and full windows run anyway)."""
    assert bench.draft_budgets("80,20,20") == [20, 80] and bench.draft_budgets("") == []
    for bad in ("0", "20,0", "x", "20,x", "2.5", "-1"):
        with pytest.raises(ValueError, match="--budgets"):
            bench.draft_budgets(bad)
