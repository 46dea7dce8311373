"""Speculative decoding, host side: who proposes draft tokens, how many each sequence gets, and what
came of them. numpy-free and jax-free; the target verifies in the step itself (`sampler.verify`).

A `Proposer` guesses the next tokens of sequences: `NgramProposer` (prompt lookup: the tokens that
followed the latest earlier occurrence of the sequence's last n tokens, in its own prompt and
output) or a draft model (`fastgen_jax.speculative_draft`, which runs a smaller checkpoint on the
device). An EAGLE/MTP-style head would be a third: it only has to implement `propose` (it may read
hidden states the runner keeps) and `forget`.

`Speculator.extend` runs after the scheduler has composed a step under its policy. Draft tokens only
take the budget the step leaves idle, at most `verification_rows` a step (the logit rows each
compiled step has for them); when decodes and prompts fill the budget nobody speculates. Within that
room the drafts go where they are likeliest to be accepted (the j-th draft of a sequence is worth
about alpha**j tokens), and, given each bucket's device time (`step_seconds`, measured at warm-up)
and the host's time per step (`host_seconds`, kept current; with a draft model also its k forward
passes), only as many as maximise the step's expected tokens per second: drafts that fit the bucket
the step pads to anyway cost only what a real row costs there (nothing on an accelerator; on the CPU
kernels, which multiply only real rows, `row_seconds`), ones that push it into a larger bucket must
pay for it, and a step with drafts also pays the host time that overlap would otherwise hide. Each
sequence's `k` follows its acceptance rate: an exponential moving average alpha of "the next draft
token is accepted" (Bernoulli trials: a verification with k drafts of which a were accepted is a
successes and, if a < k, one failure). The j-th draft is accepted with probability about alpha**j, so a
sequence proposes the largest k <= num_speculative_tokens with alpha**k >= MIN_WORTH, and none when
alpha < MIN_WORTH. A sequence that is not speculating (it stopped, or the cost model above gave it
no room) keeps being measured for free with a cheap proposer (a one-token proposal checked against
the token that comes), so it starts when its text turns repetitive. A costly proposer (a draft
model) cannot be measured for free: it re-tries such a sequence with one draft token every
`PROBE_EVERY` of its steps.

The output never changes: every verification row samples what plain decoding would have sampled at
that position (same logits, same per-position key), so drafts only decide how far one step gets.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as SequenceABC
from typing import Protocol

from fastgen_jax.engine.scheduler import Scheduler, SchedulerOutput, draftable, token_bucket
from fastgen_jax.engine.sequence import Sequence

MIN_WORTH = 0.35  # propose a j-th draft token while it is accepted with at least this probability
PRIOR_ACCEPTANCE = 0.5  # alpha of a sequence never measured
COOLDOWN_STEPS = 8  # after a step held back for a proposal that did not come, overlap this many
PROBE_EVERY = 32  # a costly proposer re-tries a sequence it gave up on after this many of its steps
EMA_DECAY = 0.8  # weight of the past in alpha's running counts


class Proposer(Protocol):
    """Proposes draft tokens. `free`: proposing costs next to nothing (then sequences that do not
    speculate are still measured with one-token proposals)."""

    free: bool

    def propose(self, asks: SequenceABC[tuple[Sequence, int]]) -> list[list[int]]:
        """For each (sequence, k): at most k tokens to follow its tokens (possibly none)."""
        ...

    def forget(self, request_id: str) -> None:
        """Drops what it keeps for a request that ended."""
        ...


class NgramProposer:
    """Prompt lookup: matches the sequence's last n tokens (n from `max_n` down to `min_n`) against
    its earlier tokens and proposes what followed the latest match. Keeps, per request, an index of
    every n-gram's latest end, updated with the tokens added since the last call."""

    free = True

    def __init__(self, min_n: int = 2, max_n: int = 4):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"need 1 <= min_n <= max_n, got {min_n}, {max_n}")
        self.sizes = tuple(range(max_n, min_n - 1, -1))
        self._index: dict[str, tuple[list[int], dict[tuple[int, ...], int]]] = {}

    def propose(self, asks: SequenceABC[tuple[Sequence, int]]) -> list[list[int]]:
        return [self.propose_one(seq, k) for seq, k in asks]

    def propose_one(self, seq: Sequence, k: int) -> list[int]:
        tokens = seq.all_token_ids
        index = self._indexed(seq.request_id, tokens)
        for n in self.sizes:
            if len(tokens) > n:
                end = index.get(tuple(tokens[-n:]))
                if end is not None:
                    return tokens[end : end + k]
        return []

    def forget(self, request_id: str) -> None:
        self._index.pop(request_id, None)

    def _indexed(self, request_id: str, tokens: list[int]) -> dict[tuple[int, ...], int]:
        """The index of every n-gram ending before the last token: key -> end of its latest match."""
        done, index = self._index.setdefault(request_id, ([0], {}))
        for end in range(max(done[0], 1), len(tokens)):  # n-grams ending at end - 1 < len - 1
            for n in self.sizes:
                if end >= n:
                    index[tuple(tokens[end - n : end])] = end
        done[0] = max(done[0], len(tokens))
        return index


@dataclasses.dataclass
class SpeculationStats:
    """Counters since start-up."""

    proposed_tokens: int = 0  # draft tokens verified by the target
    accepted_tokens: int = 0  # of those, accepted
    verifications: int = 0  # sequence-steps that verified at least one draft token

    @property
    def mean_accepted_length(self) -> float:
        """Draft tokens accepted per verification."""
        return self.accepted_tokens / self.verifications if self.verifications else 0.0


class _Acceptance:
    """A sequence's running acceptance counts (see the module docstring)."""

    __slots__ = ("accepted", "trials", "shadow", "idle_steps")

    def __init__(self):
        self.accepted = PRIOR_ACCEPTANCE * 2
        self.trials = 2.0
        self.shadow: int | None = None  # a one-token proposal awaiting the next token
        self.idle_steps = 0  # its steps since it last verified drafts

    @property
    def alpha(self) -> float:
        return self.accepted / self.trials

    def observe(self, accepted: int, proposed: int) -> None:
        self.accepted = EMA_DECAY * self.accepted + accepted
        self.trials = EMA_DECAY * self.trials + accepted + (accepted < proposed)


class Speculator:
    """Adds draft tokens to composed steps and learns each sequence's acceptance (module docstring).
    `max_tokens`: num_speculative_tokens; `max_rows`: draft tokens a step may hold in all."""

    def __init__(
        self,
        proposer: Proposer,
        max_tokens: int,
        max_rows: int,
        buckets: SequenceABC[int] = (),
        overlap: bool = False,
    ):
        self.proposer = proposer
        self.max_tokens = max_tokens
        self.max_rows = max_rows
        self.buckets = tuple(sorted(buckets))
        self.step_seconds: dict[int, float] = {}  # bucket -> device seconds of a step; empty: no costs
        self.row_seconds = 0.0  # what each real row of a step adds (0: a step costs its bucket whole)
        self.host_seconds = 0.0  # an EMA of the host's seconds per step
        self.overlap = overlap  # steps without drafts would overlap (hiding the host's time)
        self._held = False  # this step was composed after the last one was read, for a proposal
        self._cooldown = 0
        self._propose_seconds = 0.0  # spent in the proposer since the last observe_host
        self._first_host = True
        self.stats = SpeculationStats()
        self._acceptance: dict[str, _Acceptance] = {}
        self._worth = [MIN_WORTH ** (1 / j) for j in range(1, max_tokens + 1)]  # alpha for k >= j
        self._drafted = False  # the last step composed verifies draft tokens
        self._ready = False  # after the last step read back, a sequence worth it had a proposal

    def k_for(self, seq: Sequence) -> int:
        """Draft tokens `seq` is worth now (before budget and length caps)."""
        params = seq.sampling_params
        if seq.needs_host_sync or (params is not None and not getattr(params, "speculative", True)):
            return 0
        state = self._acceptance.get(seq.request_id)
        alpha = PRIOR_ACCEPTANCE if state is None else state.alpha
        k = sum(alpha >= w for w in self._worth)
        if not k and state is not None and not self.proposer.free and state.idle_steps >= PROBE_EVERY:
            return 1  # no free measurement with this proposer: probe now and then
        return k

    def hold_next_step(self) -> bool:
        """Whether the next step should wait for this one's tokens (no overlap): this step verifies
        drafts, or after the last step read back some sequence worth speculating for had a proposal
        ready (a proposal needs the sequence's tokens of the step before on the host). A step held
        back for a proposal that then did not come starts a cooldown of `COOLDOWN_STEPS` overlapped
        steps, so text that only now and then matches costs little overlap."""
        self._held = not self._drafted and self._ready and not self._cooldown
        return self._drafted or self._held

    def extend(self, scheduler: Scheduler, out: SchedulerOutput) -> int:
        """Gives draft tokens to the decodes of a just-composed step; returns how many in all."""
        added = self._extend(scheduler, out)
        if self._held and not added:
            self._cooldown = COOLDOWN_STEPS
        self._held, self._drafted = False, added > 0
        return added

    def _extend(self, scheduler: Scheduler, out: SchedulerOutput) -> int:
        room = min(scheduler.budget_left(out), self.max_rows)
        if room <= 0:
            return 0
        asks: list[tuple[int, Sequence, int]] = []  # (slot, sequence, most drafts worth it)
        values: list[tuple[float, int]] = []  # (expected tokens of one more draft, ask)
        for index, entry in enumerate(out.scheduled):
            if not draftable(entry):
                continue
            seq = entry.seq
            k = min(self.k_for(seq), seq.max_tokens - seq.num_output_tokens - 1, room)
            state = self._acceptance.setdefault(seq.request_id, _Acceptance()) if k > 0 else None
            if k > 0:
                values += [(state.alpha**j, len(asks)) for j in range(1, k + 1)]
                asks.append((index, seq, k))
        if not asks:
            return 0
        values.sort(key=lambda v: -v[0])
        passes = max(k for _, _, k in asks)  # a draft model runs about this many forward passes
        room = self._worth_room(out.num_tokens, [v for v, _ in values], room, passes)
        if not room:  # declined: a probe counts as made (see PROBE_EVERY)
            for _, seq, _ in asks:
                self._acceptance[seq.request_id].idle_steps = 0
            return 0
        counts = [0] * len(asks)
        for _, ask in values[:room]:
            counts[ask] += 1
        asks = [(index, seq, n) for (index, seq, _), n in zip(asks, counts, strict=True) if n]
        start = time.monotonic()
        drafts = self.proposer.propose([(seq, k) for _, seq, k in asks])
        self._propose_seconds += time.monotonic() - start
        return sum(
            scheduler.add_drafts(out, index, tokens[:k])
            for (index, _, k), tokens in zip(asks, drafts, strict=True)
            if tokens
        )

    def _worth_room(self, num_tokens: int, values: list[float], room: int, passes: int = 1) -> int:
        """How many of the best draft tokens (`values`, expected tokens each, best first) to add to a
        step of `num_tokens`: the number that maximises expected tokens per second of step time
        (`passes`: forward passes a draft model runs to propose them), if clearly better than none."""
        limit = min(room, len(values))
        if not self.step_seconds or not self.buckets:
            return limit
        host = self.host_seconds + passes * self._proposal_pass_seconds()
        device = self._device_seconds(token_bucket(num_tokens, self.buckets), num_tokens)
        plain = max(device, self.host_seconds) if self.overlap else device + self.host_seconds
        best_rate, best, gained = 1.02 * num_tokens / plain, 0, 0.0  # drafts must be clearly better
        for rows in range(1, min(limit, self.buckets[-1] - num_tokens) + 1):
            gained += values[rows - 1]
            bucket = token_bucket(num_tokens + rows, self.buckets)
            if bucket in self.step_seconds:
                rate = (num_tokens + gained) / (self._device_seconds(bucket, num_tokens + rows) + host)
                if rate > best_rate:
                    best_rate, best = rate, rows
        return best

    def _device_seconds(self, bucket: int, tokens: int) -> float:
        """A step padded to `bucket` with `tokens` real rows: the full bucket's time less the rows it
        does not use."""
        return max(self.step_seconds[bucket] - self.row_seconds * (bucket - tokens), 1e-9)

    def _proposal_pass_seconds(self) -> float:
        """One forward pass of a draft model (its measured mean); nothing for a free proposer."""
        return getattr(getattr(self.proposer, "stats", None), "seconds_per_step", 0.0)

    def observe_host(self, seconds: float) -> None:
        """Keeps the host's time per step current: an EMA of what the engine measured, less the time
        spent proposing (the cost model counts that separately)."""
        seconds = max(0.0, seconds - self._propose_seconds)
        self._propose_seconds = 0.0
        self.host_seconds = seconds if self._first_host else 0.9 * self.host_seconds + 0.1 * seconds
        self._first_host = False

    def observe(self, out: SchedulerOutput, emitted: SequenceABC) -> None:
        """Learns from a step read back: `emitted[i]` is slot i's token, or the list of tokens a slot
        with draft tokens emitted. Call after `Scheduler.postprocess`."""
        self._ready = False
        self._cooldown = max(0, self._cooldown - 1)
        for entry, tokens in zip(out.scheduled, emitted, strict=False):
            seq = entry.seq
            if not entry.needs_sample or seq.is_finished:  # finished: forgotten already, or soon
                continue
            state = self._acceptance.get(seq.request_id)
            if state is None:
                if self.k_for(seq) == 0:
                    continue  # opted out, or constrained
                state = self._acceptance[seq.request_id] = _Acceptance()
            if entry.draft_token_ids:
                proposed, accepted = len(entry.draft_token_ids), len(tokens) - 1
                state.observe(accepted, proposed)
                self.stats.proposed_tokens += proposed
                self.stats.accepted_tokens += accepted
                self.stats.verifications += 1
                state.idle_steps = 0
            elif state.shadow is not None:
                state.observe(int(tokens) == state.shadow, 1)
            state.shadow = None
            state.idle_steps += not entry.draft_token_ids
            if not seq.is_finished:
                self._look_ahead(seq, state)

    def forget(self, request_id: str) -> None:
        self._acceptance.pop(request_id, None)
        self.proposer.forget(request_id)

    def _look_ahead(self, seq: Sequence, state: _Acceptance) -> None:
        """With a free proposer: a sequence worth speculating for with a proposal ready makes the next
        step wait for this one (`hold_next_step`), and every sequence keeps a one-token proposal to
        check against its next token (if that step gives it no drafts), so its acceptance rate stays
        measured while it does not speculate."""
        worth = self.k_for(seq) > 0
        if not self.proposer.free:
            self._ready |= worth
            return
        guess = self.proposer.propose([(seq, 1)])[0]
        self._ready |= worth and bool(guess)
        state.shadow = guess[0] if guess else None
