"""The serving engine: continuous batching of requests over a fixed number of slots.

A thread owns the device. Each turn it (1) frees the slots of finished and cancelled requests,
(2) prefills waiting requests into free slots, a few prompt chunks a turn so that the slots already
decoding are not held up by a long prompt, and (3) runs up to `steps` decode steps of every busy
slot in one compiled call (nnxlm.serving.steps), then turns the new tokens into text (stop strings,
whole characters: nnxlm.serving.text) and hands each request its pieces. A slot is free again the
turn its request finishes; the next request goes into it while the others keep decoding.

Python programs (a notebook, an objective) use it directly:

    engine = Engine(model, tokenizer, slots=8, max_length=512)
    with engine:
        request = engine.submit(tokenizer.encode("def add("), Settings(max_tokens=32))
        print(request.result().choices[0].text)

HTTP (nnxlm.serving.api) and `nnxlm chat` are thin layers over the same calls.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nnxlm.generation import _jit_for_decoding, check_sampling
from nnxlm.serving import steps as device
from nnxlm.serving.metrics import Metrics
from nnxlm.serving.text import Completion, TokenInfo

END_IDS = 8  # end tokens the device checks (the tokenizer's eos and the model's other end-of-turn tokens)


# compiled once a process for each model structure (graphdef) and shape: engines of the same model share them
_PREFILL = _jit_for_decoding(static_argnums=(0,), donate_argnums=(2, 3))(device.prefill_chunk)
_DECODE = _jit_for_decoding(static_argnums=(0,), donate_argnums=(2, 3), static_argnames=("steps", "rows"))(
    device.decode_steps
)


class QueueFull(Exception):
    """Every slot is busy and the queue of waiting requests is full: try again later."""


class TooManyChoices(ValueError):
    """A submission of more choices than the slots and the queue together hold: it could never start."""


class ShuttingDown(Exception):
    """The engine is draining or closed."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to continue one prompt. temperature 0 is greedy; top_k 0 and top_p 1 keep every token;
    seed None draws one. Choice i of n uses seed + i, so choice 0 is the request with n=1."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    top_logprobs: int = 0  # how many of the most likely tokens to report with each token

    def __post_init__(self):
        """ValueError naming a setting out of its range (the API checks requests before; this is
        for the engine used from Python)."""
        for name, low in (("max_tokens", 1), ("n", 1), ("top_k", 0), ("top_logprobs", 0)):
            value = getattr(self, name)
            if not isinstance(value, int | np.integer) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        check_sampling(self.max_tokens, self.temperature, None, self.top_p)
        if not self.temperature < float("inf"):
            raise ValueError(f"temperature must be finite, got {self.temperature!r}")


@dataclasses.dataclass
class Update:
    """Text (and tokens) of one choice that may be shown now; finish_reason on its last update."""

    choice: int
    text: str
    tokens: list[TokenInfo]
    finish_reason: str | None = None


@dataclasses.dataclass
class Result:
    choices: list[Completion]
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return sum(c.generated for c in self.choices)


class Request:
    """A prompt in the engine: read its updates with `updates()` (blocking) or `poll()`."""

    def __init__(self, engine: Engine, prompt_ids: list[int], settings: Settings, notify: Callable | None):
        self.prompt_ids, self.settings, self.notify = prompt_ids, settings, notify
        seed = secrets.randbits(31) if settings.seed is None else settings.seed
        end_ids = frozenset(engine.end_ids) | frozenset(settings.stop_token_ids)
        context = prompt_ids[-8:]
        self.seeds = [(seed + i) % 2**32 for i in range(settings.n)]
        self.choices = [Completion(engine.tokenizer, context, settings.stop, end_ids) for _ in range(settings.n)]
        self.submitted = time.perf_counter()
        self.last_token: list[float | None] = [None] * settings.n
        self.error: str | None = None
        self.cancelled = False
        self._updates: queue.SimpleQueue = queue.SimpleQueue()
        self._open = settings.n  # choices not finished

    @property
    def finished(self) -> bool:
        return self._open == 0

    def cancel(self) -> None:
        """Frees the request's slots at the engine's next turn (a client that went away)."""
        self.cancelled = True

    def poll(self) -> list[Update]:
        """The updates that arrived since the last call, without waiting."""
        out = []
        while True:
            try:
                out.append(self._updates.get_nowait())
            except queue.Empty:
                return out

    def updates(self, timeout: float | None = None) -> Iterator[Update]:
        """Every update until each choice has finished (raises RuntimeError if the request failed)."""
        open_choices = self.settings.n
        while open_choices:
            update = self._updates.get(timeout=timeout)
            if update.finish_reason == "error":
                raise RuntimeError(self.error)
            open_choices -= update.finish_reason is not None
            yield update

    def result(self, timeout: float | None = None) -> Result:
        for _ in self.updates(timeout):
            pass
        return Result(self.choices, len(self.prompt_ids))

    def _put(self, update: Update) -> None:
        self._updates.put(update)
        if update.finish_reason is not None:
            self._open -= 1


@dataclasses.dataclass
class _Slot:
    request: Request
    choice: int
    prefilled: int = 0  # prompt tokens in the cache so far


class Engine:
    """Continuous batching over `slots` rows of `max_length` tokens (prompt and completion); up to
    `steps` tokens of every slot are decoded per host round trip, prompts are prefilled `chunk`
    tokens a call, at most `prefill_chunks` calls a turn. At most `max_queue` choices wait for a
    slot. With a mesh (model sharded on it, e.g. over "tensor"), the cache is sharded by the same
    rules as the model's keys and values."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        slots: int = 16,
        max_length: int = 1024,
        steps: int = 8,
        chunk: int = 64,
        prefill_chunks: int = 16,
        max_queue: int = 64,
        end_ids: tuple[int, ...] = (),
        mesh=None,
    ):
        for name, value in (("slots", slots), ("max_length", max_length), ("steps", steps), ("chunk", chunk)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.tokenizer, self.num_slots, self.steps, self.chunk = tokenizer, slots, steps, chunk
        self.max_length = max_length  # what a request may take; a cache row is whole chunks, so that
        self._row_length = -(-max_length // chunk) * chunk  # chunks of a prompt never run past a row
        self.prefill_chunks, self.max_queue, self.mesh = max(1, prefill_chunks), max_queue, mesh
        ends = [tokenizer.eos_id, *end_ids]
        self.end_ids = tuple(dict.fromkeys(int(i) for i in ends if i is not None))[:END_IDS]
        self._end_ids = np.full(END_IDS, -1, np.int32)
        self._end_ids[: len(self.end_ids)] = self.end_ids
        self.metrics = Metrics(slots)

        model = nnx.merge(*nnx.split(model))  # a view of the same arrays
        if getattr(model, "scan_layers", False):
            model.unstack_layers()  # per-layer arrays (a copy of the layers): decoding slices none
        self.graphdef, self.state = nnx.split(model)
        self._cache_template = model.init_cache
        self._prefill = functools.partial(_PREFILL, self.graphdef)
        self._decode = functools.partial(_DECODE, self.graphdef)
        # decode programs for the first 1, 2, 4, ... slots: requests take the lowest free slot, so
        # at light load a call computes few rows (one compilation each, at warm_up)
        self.row_counts = sorted({min(2**i, slots) for i in range(slots.bit_length() + 1)})
        self._reset_device_state()

        self._slots: list[_Slot | None] = [None] * slots
        self._waiting: collections.deque[tuple[Request, int]] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    # -- the public calls ------------------------------------------------------------------------

    def submit(self, prompt_ids, settings: Settings, notify: Callable | None = None) -> Request:
        """Queues a prompt (token ids). ValueError when it does not fit, QueueFull, ShuttingDown."""
        return self.submit_all([prompt_ids], [settings], notify)[0]

    def submit_all(self, prompts, settings: list[Settings], notify: Callable | None = None) -> list[Request]:
        """Queues prompts (token ids) together, each with its settings: all of them or none.
        ValueError when one does not fit the context, TooManyChoices (a ValueError) when their
        choices together are more than the slots and the queue hold (they never could start);
        QueueFull when they do not fit now; ShuttingDown."""
        prompts = [[int(i) for i in prompt_ids] for prompt_ids in prompts]
        for prompt_ids, s in zip(prompts, settings, strict=True):
            self.check(len(prompt_ids), s)
        choices = sum(s.n for s in settings)
        if choices > self.capacity:
            raise TooManyChoices(
                f"{choices} choices (prompts x n) at once, but this engine takes at most {self.capacity} "
                f"({self.num_slots} slots and a queue of {self.max_queue}): send fewer prompts or a smaller n"
            )
        requests = [Request(self, p, s, notify) for p, s in zip(prompts, settings, strict=True)]
        with self._wake:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._waiting) + choices > self.max_queue + self.free_slots():
                raise QueueFull(f"{len(self._waiting)} choices are waiting for one of {self.num_slots} slots")
            for request in requests:
                self._waiting.extend((request, i) for i in range(request.settings.n))
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()
        return requests

    @property
    def capacity(self) -> int:
        """The most choices one submission may hold: every slot and the whole queue."""
        return self.num_slots + self.max_queue

    def check(self, prompt_length: int, settings: Settings) -> None:
        if prompt_length < 1:
            raise ValueError("the prompt is empty: give at least one token")
        if prompt_length + settings.max_tokens > self.max_length:
            raise ValueError(
                f"this model's context is {self.max_length} tokens, but {prompt_length} prompt tokens and "
                f"max_tokens {settings.max_tokens} ask for {prompt_length + settings.max_tokens}: "
                "shorten the prompt or lower max_tokens"
            )

    def free_slots(self) -> int:
        return sum(slot is None for slot in self._slots)

    def warm_up(self) -> None:
        """Compiles both programs before the first request (call it before start): every request
        setting is an array argument of them, so no request waits for a compilation."""
        if any(self._slots):
            raise RuntimeError("warm_up runs before any request")
        self._prefill_chunk(0, _Slot(Request(self, [0], Settings(1), None), 0))
        for rows in self.row_counts:
            self._decode_all(rows)
        self._reset_device_state()
        self.metrics = Metrics(self.num_slots)  # counts requests only

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="nnxlm-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with drain, finishes those in flight first, else cancels them."""
        with self._wake:
            self._closing = True
            if not drain:
                for request, _ in self._waiting:
                    request.cancel()
                for slot in self._slots:
                    if slot is not None:
                        slot.request.cancel()
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return
        with self._wake:  # stopped: start() may run it again
            self._closing, self._thread = False, None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close(drain=exc[0] is None)

    # -- the engine's thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or any(self._slots)) and not self._closing:
                    self._wake.wait()
                if self._closing and not (self._waiting or any(self._slots)):
                    return
            self._turn()

    def _turn(self) -> None:
        self._free_finished()
        self._admit()
        self._notify(self._prefill_some())  # first tokens go out before the decode call
        if self._active.any():
            self._notify(self._decode_all())
        self._free_finished()
        self.metrics.slots_busy.set(self.num_slots - self.free_slots())

    @staticmethod
    def _notify(requests) -> None:
        for request in requests:
            if request.notify is not None:
                request.notify()

    def _free_finished(self) -> None:
        with self._wake:
            for request, choice in list(self._waiting):
                if request.cancelled:
                    self._waiting.remove((request, choice))
                    self._end(request, choice, "cancelled")
            self.metrics.queue_depth.set(len(self._waiting))
        for s, slot in enumerate(self._slots):
            if slot is None:
                continue
            completion = slot.request.choices[slot.choice]
            if slot.request.cancelled and completion.finish_reason is None:
                self._end(slot.request, slot.choice, "cancelled")
            if slot.request.cancelled or completion.finish_reason is not None or slot.request.error:
                self._slots[s] = None
                self._active[s] = False

    def _admit(self) -> None:
        with self._wake:
            for s in range(self.num_slots):
                if self._slots[s] is None and self._waiting:
                    request, choice = self._waiting.popleft()
                    self._slots[s] = _Slot(request, choice)
                    settings = request.settings
                    self._active[s] = False
                    self._generated[s], self._limit[s] = 0, settings.max_tokens
                    self._seed[s], self._temperature[s] = request.seeds[choice], settings.temperature
                    self._top_k[s], self._top_p[s] = settings.top_k, settings.top_p
            self.metrics.queue_depth.set(len(self._waiting))

    def _prefill_some(self) -> set[Request]:
        touched, calls = set(), 0
        for s, slot in enumerate(self._slots):
            while slot is not None and slot.prefilled < len(slot.request.prompt_ids) and calls < self.prefill_chunks:
                calls += 1
                try:
                    self._prefill_chunk(s, slot)
                except Exception as e:  # noqa: BLE001 - the engine goes on with a new cache
                    self._device_failed(e)
                    return touched
                if slot.prefilled == len(slot.request.prompt_ids):
                    touched.add(slot.request)
        return touched

    def _prefill_chunk(self, s: int, slot: _Slot) -> None:
        prompt, start = slot.request.prompt_ids, slot.prefilled
        piece = prompt[start : start + self.chunk]
        ids = np.zeros(self.chunk, np.int32)
        ids[: len(piece)] = piece
        sampling = device.Sampling(*(np.asarray(x[s]) for x in self._sampling_arrays()))
        want_top = np.bool_(slot.request.settings.top_logprobs > 0)
        self._cache, self._token, first = self._prefill(
            self.state,
            self._cache,
            self._token,
            np.int32(s),
            ids,
            np.int32(start),
            np.int32(len(piece)),
            sampling,
            want_top,
        )
        slot.prefilled += len(piece)
        self.metrics.prompt_tokens.inc(len(piece))
        if slot.prefilled == len(prompt):
            token, logprob, top_ids, top_logprob = (np.asarray(x)[0] for x in first)
            self._active[s], self._generated[s] = True, 1
            self._take(s, slot, [int(token)], [float(logprob)], [top_ids], [top_logprob])

    def _decode_all(self, rows: int | None = None) -> set[Request]:
        if rows is None:  # the fewest rows holding every active slot
            last = int(np.flatnonzero(self._active)[-1]) + 1
            rows = next(n for n in self.row_counts if n >= last)
        want_top = any(slot is not None and slot.request.settings.top_logprobs > 0 for slot in self._slots)
        slots = device.Slots(
            active=self._active.copy(),
            generated=self._generated.copy(),
            limit=self._limit.copy(),
            sampling=device.Sampling(*(x.copy() for x in self._sampling_arrays())),
        )
        try:
            self._cache, self._token, out = self._decode(
                self.state,
                self._cache,
                self._token,
                slots,
                self._end_ids,
                np.bool_(want_top),
                steps=self.steps,
                rows=rows,
            )
            out = jax.tree.map(np.asarray, out)
        except Exception as e:  # noqa: BLE001 - the engine goes on with a new cache
            self._device_failed(e)
            return set()
        touched = set()
        for s, slot in enumerate(self._slots[:rows]):
            if slot is None or not self._active[s] or out.count[s] == 0:
                continue
            n = int(out.count[s])
            self._generated[s] += n
            self._take(
                s,
                slot,
                out.ids[s, :n].tolist(),
                out.logprob[s, :n].tolist(),
                out.top_ids[s, :n],
                out.top_logprob[s, :n],
            )
            touched.add(slot.request)
        return touched

    def _take(self, s: int, slot: _Slot, ids, logprobs, top_ids, top_logprobs) -> None:
        """Feeds a slot's new tokens to its choice and hands the request what may be shown."""
        request, choice = slot.request, slot.choice
        completion = request.choices[choice]
        if completion.finish_reason is not None or request.cancelled:
            return
        try:
            k = request.settings.top_logprobs
            for token, logprob, tops, top_lps in zip(ids, logprobs, top_ids, top_logprobs, strict=True):
                top = list(zip(np.asarray(tops)[:k].tolist(), np.asarray(top_lps)[:k].tolist(), strict=True))
                if completion.add(token, logprob, top):
                    break
            if completion.finish_reason is None and completion.generated >= request.settings.max_tokens:
                completion.finish_length()
            text, tokens = completion.release()
        except Exception as e:  # noqa: BLE001 - one request's failure (its text, its stop strings) is its own
            self._fail(request, e)
            return
        now = time.perf_counter()
        self.metrics.generation_tokens.inc(len(ids))
        last = request.last_token[choice]
        if last is None:
            self.metrics.time_to_first_token.observe(now - request.submitted)
        else:
            for _ in ids:
                self.metrics.inter_token_latency.observe((now - last) / len(ids))
        request.last_token[choice] = now
        if text or tokens or completion.finish_reason:
            request._put(Update(choice, text, tokens, completion.finish_reason))
        if completion.finish_reason is not None:
            self._active[s] = False  # decodes no more, from this turn on
            self._end(request, choice, "ok")

    def _end(self, request: Request, choice: int, outcome: str) -> None:
        if outcome == "cancelled":
            request._put(Update(choice, "", [], "cancelled"))
        if request.finished:
            self.metrics.requests.labels(outcome if not request.cancelled else "cancelled").inc()
            self.metrics.request_latency.observe(time.perf_counter() - request.submitted)

    def _fail(self, request: Request, error: Exception) -> None:
        if request.error is None:
            request.error = f"{type(error).__name__}: {error}"
            for choice, completion in enumerate(request.choices):
                if completion.finish_reason is None:
                    completion.finish_reason = "error"
                    request._put(Update(choice, "", [], "error"))
            self.metrics.requests.labels("error").inc()
            if request.notify is not None:
                request.notify()

    def _device_failed(self, error: Exception) -> None:
        """A compiled call failed: the cache it was given is gone, so every request in a slot fails."""
        for slot in self._slots:
            if slot is not None:
                self._fail(slot.request, error)
        self._reset_device_state()

    # -- device state ----------------------------------------------------------------------------

    def _sampling_arrays(self):
        return self._seed, self._temperature, self._top_k, self._top_p

    def _reset_device_state(self) -> None:
        n = self.num_slots
        self._active = np.zeros(n, bool)
        self._generated, self._limit = np.zeros(n, np.int32), np.zeros(n, np.int32)
        self._seed, self._temperature = np.zeros(n, np.uint32), np.zeros(n, np.float32)
        self._top_k, self._top_p = np.zeros(n, np.int32), np.ones(n, np.float32)
        cache = jax.eval_shape(lambda: self._cache_template(n, self._row_length, stacked=False))
        cache = dataclasses.replace(cache, index=jax.ShapeDtypeStruct((n,), jnp.int32))
        shardings = self._cache_shardings(cache)
        self._cache = jax.jit(
            lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), cache), out_shardings=shardings
        )()
        self._token = jnp.zeros(n, jnp.int32)

    def _cache_shardings(self, cache):
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding

        from nnxlm.sharding.rules import fit_spec, logical_to_spec

        def sharding(x, axes):
            return NamedSharding(self.mesh, fit_spec(x.shape, logical_to_spec(axes), self.mesh))

        axes = cache.logical_axes()
        return jax.tree.map(sharding, cache, axes)
