"""Completions through the swarm for the HTTP API: one request's generation, streamed token by token.

A ``Completion`` runs ``DistributedModelForCausalLM.generate`` on a worker thread (each thread has its own inference
session on the peers) and hands text to the event loop as it is produced. Greedy requests (``temperature`` 0) give
exactly what ``model.generate(input_ids, do_sample=False)`` gives; sampled ones draw from the request's own
generator, so a ``seed`` reproduces a completion whatever else the server generates at the same time.

    completion = Completion(model, tokenizer, input_ids_1T, Sampling(max_tokens=20), loop, deadline)
    executor.submit(completion.run)
    async for delta in completion.deltas(): ...          # text as it is decoded; then completion.finish_reason

Generation stops at the model's end-of-text token, after ``max_tokens``, at the first of ``stop`` strings (which is
not part of the text), when ``cancel()`` is called (a client that went away: the session on the peers closes),
or at the deadline (``timed_out``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

__all__ = ["Completion", "Sampling"]

_DONE = object()  # end of a completion's text queue


@dataclass(frozen=True)
class Sampling:
    """How one completion is drawn. ``temperature`` 0 is greedy decoding."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


class _Sampler(LogitsProcessor):
    """Samples the next token with the request's own generator, and leaves only it for generate()'s greedy pick:
    concurrent requests never share torch's global random state."""

    def __init__(self, sampling: Sampling):
        self.warpers = [TemperatureLogitsWarper(sampling.temperature)]
        if sampling.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(sampling.top_p))
        self.generator = torch.Generator()
        if sampling.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(sampling.seed)

    def __call__(self, input_ids_BT: torch.Tensor, scores_BV: torch.Tensor) -> torch.Tensor:
        for warp in self.warpers:
            scores_BV = warp(input_ids_BT, scores_BV)
        probs_BV = torch.softmax(scores_BV.float(), dim=-1)
        picked_B1 = torch.multinomial(probs_BV, 1, generator=self.generator)
        only_BV = torch.full_like(scores_BV, -float("inf"))
        return only_BV.scatter_(1, picked_B1, 0.0)


@dataclass
class Completion:
    """One request's generation; ``run`` on a worker thread, ``deltas`` on the event loop."""

    model: object  # a DistributedModelForCausalLM
    tokenizer: object
    input_ids_1T: torch.Tensor
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which generation stops
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the completion's text so far (final once finished)
    finish_reason: str | None = None  # "stop" (end of text or a stop string) or "length"
    timed_out: bool = False
    error: BaseException | None = None
    token_times: list[float] = field(default_factory=list)  # time.perf_counter() as each token arrived
    _sent: int = 0  # characters of text already handed to deltas()
    _stopped: bool = False

    def __post_init__(self):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids_1T.shape[1]

    def cancel(self) -> None:
        """Stops generating at the next token (the client went away); the peers' session is closed."""
        self._cancelled.set()

    def run(self) -> None:
        """Generates (blocking; on a worker thread), feeding ``deltas``."""
        try:
            sampled = self.sampling.temperature > 0
            self.model.generate(
                self.input_ids_1T,
                max_new_tokens=self.sampling.max_tokens,
                do_sample=False,  # sampled requests pick in _Sampler, with their own generator
                logits_processor=LogitsProcessorList([_Sampler(self.sampling)] if sampled else []),
                stopping_criteria=StoppingCriteriaList([_Stopped(self)]),
                streamer=_Streamer(self),
                pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            )
            if self.finish_reason is None:
                self.finish_reason = "stop" if self._ended_by_eos() else "length"
        except BaseException as e:  # handed to the request's coroutine, which answers with it
            self.error = e
        finally:
            self._publish(final=True)
            self.loop.call_soon_threadsafe(self._queue.put_nowait, _DONE)

    async def deltas(self):
        """The completion's text in pieces, as generated (an async iterator; ends when generation does)."""
        while (piece := await self._queue.get()) is not _DONE:
            yield piece

    async def result(self) -> str:
        """The whole text, once generation ends."""
        async for _ in self.deltas():
            pass
        return self.text

    def _ended_by_eos(self) -> bool:
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return bool(self.token_ids) and self.token_ids[-1] in eos_ids

    def _add_tokens(self, token_ids: list[int]) -> None:
        self.token_times.extend([time.perf_counter()] * len(token_ids))
        self.token_ids.extend(token_ids)
        self._publish(final=False)

    def _publish(self, *, final: bool) -> None:
        """Decodes the tokens so far and queues the new text that can no longer change: an incomplete character
        (a multi-byte one split across tokens) or a possible start of a stop string waits for the next token."""
        if self._stopped:
            return
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        found = [i for i in (text.find(s) for s in self.sampling.stop) if i >= 0]
        if found:
            text, final = text[: min(found)], True
            self.finish_reason, self._stopped = "stop", True
        elif not final:
            text = text.rstrip("\ufffd")
            text = text[: len(text) - _held_back(text, self.sampling.stop)]
        if len(text) > self._sent:
            piece, self._sent = text[self._sent :], len(text)
            self.loop.call_soon_threadsafe(self._queue.put_nowait, piece)
        if final:
            self.text = text

    def _should_stop(self) -> bool:
        if time.monotonic() > self.deadline:
            self.timed_out = True
        return self._stopped or self._cancelled.is_set() or self.timed_out


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    return max(
        (n for stop in stops for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])),
        default=0,
    )


class _Streamer:
    """generate()'s streamer: the prompt first (skipped), then each new token."""

    def __init__(self, completion: Completion):
        self.completion, self.prompt_seen = completion, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.completion._add_tokens(value.reshape(-1).tolist())

    def end(self) -> None:
        pass


class _Stopped(StoppingCriteria):
    def __init__(self, completion: Completion):
        self.completion = completion

    def __call__(self, input_ids_BT: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        stop = self.completion._should_stop()
        return torch.full((input_ids_BT.shape[0],), stop, dtype=torch.bool)
