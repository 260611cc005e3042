"""A bound on every in-process engine the tests start (`conftest.make_engine`, and the folder
fuzz's): an engine that steps `STALL_STEPS` times in a row without progress fails the test
(AssertionError naming the stuck requests, which are aborted) instead of spinning in
`LLM.generate` forever.

Progress, per step: a request joined or left the scheduler (finished or aborted), or some request
committed an output token, or computed a prompt token beyond the most it had computed before.  A
pairing livelock (a member admitted, sampled alone, discarded and rolled back, step after step)
does none of these, nor does a request no budget ever reaches.  Steps with nothing the scheduler
would run (`get_num_unfinished_requests() == 0`: a pause, requests waiting for streamed input)
are not counted: waiting there is the test's choice.
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
        # Keyed by the request object too: an id reused after an abort is a new request.
        now = {(rid, id(r)): (r.num_output_tokens, r.num_computed_tokens) for rid, r in requests.items()}
        moved = now.keys() != self.seen.keys() or any(
            out > self.seen[key][0] or computed > self.seen[key][1] for key, (out, computed) in now.items()
        )
        # High-water marks: a token computed, rolled back and computed again is no progress.
        self.seen = {key: (max(out, self.seen.get(key, (0, 0))[0]), max(c, self.seen.get(key, (0, 0))[1]))
                     for key, (out, c) in now.items()}
        return moved

    def __call__(self):
        engine, scheduler = self.engine(), self.scheduler()
        outputs = type(engine).step(engine)
        waiting_by_choice = scheduler.get_num_unfinished_requests() == 0
        self.idle = 0 if self.progress(scheduler.requests) or waiting_by_choice else self.idle + 1
        if self.idle >= self.limit:
            stuck = {rid: (r.status.name, r.num_computed_tokens, r.num_output_tokens)
                     for rid, r in scheduler.requests.items()}
            self.idle = 0
            # By the ids the test gave (a parallel-sampling parent takes its children along),
            # then whatever the scheduler still holds.
            engine.abort_request(list(engine.output_processor.external_req_ids), internal=False)
            engine.engine_core.abort_requests(list(scheduler.requests))
            raise AssertionError(f"engine stalled: {self.limit} steps without progress; requests "
                                 f"(status, computed, output tokens), now aborted: {stuck}")
        return outputs
