"""The seed probe: does this server give a position the same logits in a one-row pass and in a
full window, alone and in a batch?

Gumbel-coupled verification commits plain decoding's token for a seed at every position, so "a
seed names one image, with SJD++ on or off, at any load", provided the logits of a position do
not depend on the shape of the pass that computes them.  That is a property of the kernels: it
holds for float32 on the CPU builds measured here, it fails for bf16 emulated on AVX2 CPUs (a
matmul over 33 rows rounds otherwise than over one), and on GPUs it needs vLLM's batch-invariant
mode (`VLLM_BATCH_INVARIANT=1`).  So each SJD++ server checks it at start-up, in the dtype and
compilation mode it serves, with a few greedy requests of its own (`patches.engine_core`):

1. `reference`: one request decoded plainly, alone: every row comes from a one-row pass;
2. `window`: the same prompt with SJD++ and full windows (k drafts), alone;
3. `batch`: two plain and two SJD++ copies at once.

`SeedProbe` sits in the SJD++ sampler while they run and keeps each row of the reference by its
prefix (the tokens before the position it predicts).  Every later row whose prefix the reference
also computed is compared with it bit for bit.  The verdict (`identical`: True, False, or None
where nothing could be compared) stays on the runner for the images endpoint to report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch

PREFIX = "sjdpp-seed-probe:"
PHASES = ("reference", "window", "batch")


def probe_request_id(phase: str, index: int) -> str:
    return f"{PREFIX}{phase}:{index}"


def phase_of(req_id: str) -> str | None:
    """The probe phase a request belongs to; None for any other request."""
    if not req_id.startswith(PREFIX):
        return None
    return req_id[len(PREFIX):].split(":", 1)[0]


@dataclass
class Verdict:
    """What the probe found.  `identical`: every compared row equal bit for bit (None: no row
    could be compared).  Per phase: rows compared and rows that differ, and the largest absolute
    difference seen."""

    identical: bool | None
    compared: dict[str, int] = field(default_factory=dict)
    differing: dict[str, int] = field(default_factory=dict)
    max_abs_diff: float = 0.0
    mode: str = ""  # the model's dtype and whether it runs compiled

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        rows = ", ".join(f"{phase}: {self.differing.get(phase, 0)} of {n} rows differ" for phase, n in self.compared.items())
        if self.identical is None:
            return f"SJD++ seed probe: nothing to compare ({self.mode}); whether a seed names one image is unknown"
        if self.identical:
            return (f"SJD++ seed probe: a position's logits are bit-identical in one-row passes, full windows and "
                    f"batches ({self.mode}; {rows}): a seed names one image with SJD++ on or off")
        return (f"SJD++ seed probe: a position's logits depend on the shape of the pass ({self.mode}; {rows}; "
                f"largest difference {self.max_abs_diff:.3g}): SJD++ samples the same distribution, but a seed "
                f"may name another image with SJD++ on than off, or under another load. To make seeds identical: "
                f"--dtype float32 on a CPU, VLLM_BATCH_INVARIANT=1 on a GPU")


class SeedProbe:
    """Records the probe requests' logits rows in the SJD++ sampler (`record`) and compares them
    (`verdict`)."""

    def __init__(self, mode: str = "") -> None:
        self.reference: dict[bytes, torch.Tensor] = {}
        self.compared = {p: 0 for p in PHASES[1:]}
        self.differing = {p: 0 for p in PHASES[1:]}
        self.max_abs_diff = 0.0
        self.mode = mode

    def record(self, input_batch, metadata, logits: torch.Tensor, scheduled: np.ndarray) -> None:
        """One pass: `logits` [sum over requests of (drafts + 1), V] as the sampler receives them
        (vLLM's `SpecDecodeMetadata` rows), `scheduled` [requests] the positions each request
        ran.  Row j of a request that has committed c tokens (its prompt included) predicts
        position c + j from its c tokens and its first j drafts.  Prefill passes are left out:
        their shape follows the prompt and the prefix cache, not SJD++."""
        num_reqs = len(metadata.num_draft_tokens)
        ends = metadata.cu_num_sampled_tokens.tolist()
        for i, req_id in enumerate(input_batch.req_ids[:num_reqs]):
            phase = phase_of(req_id)
            if phase is None or scheduled[i] != metadata.num_draft_tokens[i] + 1:
                continue
            committed = int(input_batch.num_tokens_no_spec[i])
            n = metadata.num_draft_tokens[i]
            drafts = list(input_batch.spec_token_ids[i][:n]) if n else []
            prefix = np.concatenate([input_batch.token_ids_cpu[i, :committed], drafts]).astype(np.int64)
            rows = logits[ends[i] - (n + 1): ends[i]]
            for j in range(n + 1):
                key = prefix[: committed + j].tobytes()
                if phase == "reference":
                    self.reference.setdefault(key, rows[j].clone())
                elif key in self.reference:
                    self._compare(phase, rows[j], self.reference[key])

    def _compare(self, phase: str, row: torch.Tensor, reference: torch.Tensor) -> None:
        self.compared[phase] += 1
        if not torch.equal(row, reference):
            self.differing[phase] += 1
            finite = torch.isfinite(row) & torch.isfinite(reference)
            diff = (row.float() - reference.float())[finite].abs().max() if finite.any() else torch.tensor(float("inf"))
            self.max_abs_diff = max(self.max_abs_diff, float(diff))

    def verdict(self) -> Verdict:
        compared = sum(self.compared.values())
        identical = None if compared == 0 else not any(self.differing.values())
        return Verdict(identical, dict(self.compared), dict(self.differing), self.max_abs_diff, self.mode)


def start(runner) -> None:
    """Before the probe requests: full windows (the budget set aside) and rows recorded."""
    sampler = runner.rejection_sampler
    runner.sjdpp_probe_budget = runner.sjdpp.config.draft_token_budget
    runner.sjdpp.set_draft_token_budget(None)
    model_config = runner.model_config
    compiled = "eager" if model_config.enforce_eager else "compiled"
    sampler.seed_probe = SeedProbe(f"{str(model_config.dtype).removeprefix('torch.')}, {compiled}")


def finish(runner) -> dict | None:
    """After them: the budget back, and the verdict kept on the runner (None: never probed)."""
    sampler = runner.rejection_sampler
    probe, sampler.seed_probe = sampler.seed_probe, None
    runner.sjdpp.set_draft_token_budget(runner.sjdpp_probe_budget)
    runner.sjdpp_seed_verdict = probe.verdict().to_dict() if probe is not None else None
    return runner.sjdpp_seed_verdict
