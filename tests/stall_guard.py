"""A bound on every in-process engine the tests start (`conftest.make_engine`): an engine that
steps `STALL_STEPS` times in a row without progress fails the test (AssertionError naming the
stuck requests, which are aborted) instead of spinning in `LLM.generate` forever.

Progress, per step: a request joined or left the scheduler (finished, aborted, refused), or some
request committed an output token, or computed a prompt token beyond the most it had computed
before.  A pairing livelock (a member admitted, sampled alone, discarded and rolled back, step
after step) does none of these, nor does a request no budget ever reaches.
"""

from __future__ import annotations

import weakref

STALL_STEPS = 300


class StallGuard:
    """Wraps `llm.llm_engine.step` (in-process engines: vLLM's `InprocClient`).  It holds the
    engine weakly: a cycle through the engine's own attribute would keep a finished module's
    engine alive until a collection that may come while the next module's engine runs, and its
    shutdown would then tear down the process's parallel groups under it."""

    def __init__(self, llm, limit: int = STALL_STEPS):
        engine = llm.llm_engine
        self.engine, self.limit = weakref.ref(engine), limit
        self.scheduler = weakref.ref(engine.engine_core.engine_core.scheduler)
        self.idle, self.seen = 0, {}
        engine.step = self

    def progress(self, requests: dict) -> bool:
        now = {rid: (r.num_output_tokens, r.num_computed_tokens) for rid, r in requests.items()}
        moved = now.keys() != self.seen.keys() or any(
            out > self.seen[rid][0] or computed > self.seen[rid][1] for rid, (out, computed) in now.items()
        )
        # High-water marks: a token computed, rolled back and computed again is no progress.
        self.seen = {rid: (max(out, self.seen.get(rid, (0, 0))[0]), max(c, self.seen.get(rid, (0, 0))[1]))
                     for rid, (out, c) in now.items()}
        return moved

    def __call__(self):
        engine, requests = self.engine(), self.scheduler().requests
        outputs = type(engine).step(engine)
        self.idle = 0 if self.progress(requests) or not requests else self.idle + 1
        if self.idle >= self.limit:
            stuck = {rid: (r.status.name, r.num_computed_tokens, r.num_output_tokens) for rid, r in requests.items()}
            self.idle = 0
            engine.abort_request(list(engine.output_processor.request_states), internal=True)
            raise AssertionError(f"engine stalled: {self.limit} steps without progress; requests "
                                 f"(status, computed, output tokens), now aborted: {stuck}")
        return outputs
