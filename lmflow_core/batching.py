"""The generation engine behind ``lmflow serve``: concurrent requests share the model (continuous batching).

Requests are :class:`Job` objects handed to an :class:`Engine`, whose one worker thread owns the model:

* **Batched** (the default, whenever no plugin implements the ``decode`` hook): a request arriving while others
  decode is prefilled alone (its own KV cache), then joins the running batch; every step decodes one token for
  every sequence in the batch, and a sequence leaves as soon as it is done. The batch's KV cache is the
  sequences' caches left-padded to a common length, with an attention mask hiding the padding and explicit
  position ids, so each sequence sees exactly what it would see alone: greedy outputs equal one-at-a-time
  outputs. Sampling settings (temperature, top-k, top-p, repetition penalty, seed) are per request; a seeded
  request draws from its own generator, so its output does not depend on the other requests in the batch.
* **One at a time** (``max_batch_size=1``, or a plugin decodes, e.g. ``speculative``): each request goes
  through the ``decode`` hook as ``lmflow generate`` does. So does a request with model inputs beside its token
  ids (the pixel values of its images): the batch's decoding steps feed token ids only, so it is generated
  alone, and the running batch resumes after it.

Either way, a job stops within one decoding step of being cancelled (a client that went away) or of reaching
its deadline (the per-request time limit; the text so far is returned with finish reason ``"length"``).
"""

from __future__ import annotations

import inspect
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .generate import Generation, GenerationOptions, TextStream, finished_generation, generate_from_ids


class Busy(Exception):
    """Too many requests are waiting for the model."""


@dataclass(eq=False)
class Job:
    """One generation request. Read ``result`` (or ``error``) once ``done`` is set.

    ``inputs`` are the prompt's model inputs beside its ids (``prompt_inputs``: pixel values...); a job with
    inputs is generated alone (the batch's decoding steps feed token ids only).
    """

    prompt_ids: list[int]
    options: GenerationOptions
    on_text: Callable[[str], None] | None = None
    on_done: Callable[[], None] | None = None
    deadline: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None
    error: BaseException | None = None

    def cancel(self) -> None:
        """Stop generating for this job (its client is gone); it ends within one decoding step."""
        self.cancelled.set()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or (self.deadline is not None and time.monotonic() > self.deadline)

    def finish(self, result: Generation | None = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()
        if self.on_done is not None:
            self.on_done()


class Engine:
    """Runs jobs on ``session``'s model in one worker thread; see the module docstring.

    Args:
        session: an :class:`lmflow_core.inference.InferenceSession`.
        max_batch_size: most sequences decoded together; 1 serves one request at a time.
        max_waiting: most jobs waiting for a place in the batch; :meth:`submit` raises :class:`Busy` beyond.
    """

    def __init__(self, session: Any, max_batch_size: int = 16, max_waiting: int = 64):
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_waiting = max_waiting
        self.batched = max_batch_size > 1 and not plugin_decodes(session.plugins.hook)
        self.waiting: queue.Queue[Job | None] = queue.Queue()
        self.running = 0
        self.closed = False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._work, name="lmflow-engine", daemon=True)
        self.thread.start()

    @property
    def in_flight(self) -> int:
        """Jobs waiting or generating."""
        return self.waiting.qsize() + self.running

    def submit(
        self,
        prompt_ids: list[int],
        options: GenerationOptions,
        on_text: Callable[[str], None] | None = None,
        on_done: Callable[[], None] | None = None,
        timeout: float | None = None,
        inputs: dict[str, Any] | None = None,
    ) -> Job:
        """Queue a generation; raises :class:`Busy` when ``max_waiting`` jobs are already waiting.

        ``inputs`` (pixel values...) make the job run alone, through the ``decode`` hook, while the batch waits.
        """
        with self.lock:
            if self.closed:
                raise Busy("the server is shutting down")
            if self.waiting.qsize() >= self.max_waiting:
                raise Busy(f"{self.waiting.qsize()} requests are already waiting for the model")
            job = Job(
                list(prompt_ids),
                options,
                on_text,
                on_done,
                deadline=time.monotonic() + timeout if timeout else None,
                inputs=dict(inputs or {}),
            )
            self.waiting.put(job)
        return job

    def cancel_all(self) -> None:
        """Cancel every job, waiting or running."""
        for job in list(self.waiting.queue):
            if job is not None:
                job.cancel()
        self._cancel_running = True

    def close(self, timeout: float = 10) -> None:
        """Cancel everything and stop the worker."""
        with self.lock:
            self.closed = True
        self.cancel_all()
        self.waiting.put(None)
        self.thread.join(timeout)

    # ---- the worker --------------------------------------------------------------------------------------

    _cancel_running = False

    def _work(self) -> None:
        batch = Batch(self.session) if self.batched else None
        while True:
            try:
                if not self._turn(batch):
                    return
            except (
                Exception
            ) as exc:  # a bug must not stop the server: the requests in the batch get the error
                if batch is not None:
                    batch.fail(exc)
                self.running = len(batch.rows) if batch is not None else 0

    def _turn(self, batch: Batch | None) -> bool:
        """Admit waiting jobs and decode one step (or run one job alone); False once the engine is closed."""
        if batch is None or not batch.rows:
            job = self.waiting.get()  # nothing to decode: wait for work
            if job is None:
                return False
            self.running += 1
            if batch is None or job.inputs:
                self._run_alone(job)
                self.running -= 1
                return True
            batch.join(job)
            self.running = len(batch.rows)
        while len(batch.rows) < self.max_batch_size:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if job is None:
                batch.fail(Cancelled())
                return False
            self.running += 1
            if job.inputs:  # the running rows wait one generation: the batch has no place for pixel values
                self._run_alone(job)
            else:
                batch.join(job)
            self.running = len(batch.rows)
        if self._cancel_running:
            batch.cancel_all()
            self._cancel_running = False
        batch.step()
        self.running = len(batch.rows)
        return True

    def _run_alone(self, job: Job) -> None:
        session = self.session
        if job.should_stop():
            _refuse(job)
            return
        try:
            result = generate_from_ids(
                session.plugins.hook,
                session.model,
                session.tokenizer,
                job.prompt_ids,
                job.options,
                job.on_text,
                session.config,
                should_stop=lambda: job.should_stop() or self._cancel_running,
                inputs=job.inputs,
            )
        except Exception as exc:  # handed to the waiting request
            job.finish(error=exc)
            return
        job.finish(result)


class Cancelled(Exception):
    """The job was cancelled before it produced anything."""


class TimedOut(Exception):
    """The job reached its deadline before it produced anything (it waited too long for the model)."""


def _refuse(job: Job) -> None:
    """Finish a job that must stop before it starts."""
    if job.cancelled.is_set():
        job.finish(error=Cancelled())
    else:
        job.finish(
            error=TimedOut(
                "the request waited for the model past the server's time limit (--request-timeout); retry later"
            )
        )


def plugin_decodes(hook: Any) -> bool:
    """Whether a plugin implements the ``decode`` hook (then every generation must go through it)."""
    return any(
        not impl.function.__module__.startswith("lmflow_core.") for impl in hook.decode.get_hookimpls()
    )


# ---- continuous batching ------------------------------------------------------------------------------------


class Row:
    """One sequence in the batch: its job, its generated tokens, how it samples."""

    def __init__(self, job: Job, tokenizer: Any, context: int | None):
        import torch

        self.job = job
        self.options = job.options
        self.prompt_length = len(job.prompt_ids)
        self.limit = job.options.max_new_tokens
        if context:
            self.limit = max(1, min(self.limit, context - self.prompt_length))
        self.ids: list[int] = []
        self.stream = TextStream(tokenizer, self.prompt_length, job.options.stop_strings, job.on_text)
        self.stream.skip_prompt = False
        self.stops = tuple(s for s in job.options.stop_strings if s)
        self.stop_window = max((len(s) for s in self.stops), default=0) + 4
        self.generator = None
        if not job.options.greedy and job.options.seed is not None:
            self.generator = torch.Generator(device="cpu")
            self.generator.manual_seed(job.options.seed % 2**64)
        self.processors = job.options.logits_processors()
        self.finish: str | None = None


class Batch:
    """The running batch: rows, their left-padded KV cache, attention mask, positions and next input tokens."""

    def __init__(self, session: Any):
        self.session = session
        self.model = session.model
        self.tokenizer = session.tokenizer
        self.eos = session.tokenizer.eos_token_id
        self.context = session.context
        parameters = inspect.signature(self.model.forward).parameters
        self.cache_name = "cache" if "cache" in parameters else "past_key_values"
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None  # (rows, cached length): 1 for a real token, 0 for padding
        self.positions: Any = None  # (rows,): the position of each row's next input token
        self.next_tokens: Any = None  # (rows,): each row's last sampled token, not yet in the cache

    # ---- joining -----------------------------------------------------------------------------------------

    def join(self, job: Job) -> None:
        """Prefill ``job``'s prompt alone, sample its first token, and add it to the batch."""
        import torch

        if job.should_stop():
            _refuse(job)
            return
        row = Row(job, self.tokenizer, self.context)
        device = self.model.device
        try:
            with torch.no_grad():
                ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=device)
                out = self.model(input_ids=ids, use_cache=True, **self.keep_last)
            token = self._sample([row], out.logits[:, -1, :])[0]
        except Exception as exc:  # handed to the waiting request; the batch goes on
            job.finish(error=exc)
            return
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        if self._advance(row, token):
            return
        length = len(job.prompt_ids)
        mask = torch.ones((1, length), dtype=torch.long, device=device)
        position = torch.tensor([length], dtype=torch.long, device=device)
        token_tensor = torch.tensor([token], dtype=torch.long, device=device)
        if not self.rows:
            self.cache, self.mask, self.positions, self.next_tokens = cache, mask, position, token_tensor
        else:
            total = max(self.mask.shape[1], length)
            for layer, new in zip(self.cache.layers, cache.layers):
                layer.keys = torch.cat([_left_pad(layer.keys, total), _left_pad(new.keys, total)])
                layer.values = torch.cat([_left_pad(layer.values, total), _left_pad(new.values, total)])
            self.mask = torch.cat([_left_pad(self.mask, total, dim=1), _left_pad(mask, total, dim=1)])
            self.positions = torch.cat([self.positions, position])
            self.next_tokens = torch.cat([self.next_tokens, token_tensor])
        self.rows.append(row)

    # ---- one decoding step -------------------------------------------------------------------------------

    def step(self) -> None:
        """Decode one token for every row; rows that finish (or were cancelled) leave the batch."""
        import torch

        if not self.rows:
            return
        stopped = [i for i, row in enumerate(self.rows) if row.job.should_stop()]
        if stopped:
            for i in stopped:
                self._end(self.rows[i], early=True)
            self._keep([i for i in range(len(self.rows)) if i not in set(stopped)])
            if not self.rows:
                return
        ones = torch.ones((len(self.rows), 1), dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask, ones], dim=1)
        try:
            with torch.no_grad():
                out = self.model(
                    input_ids=self.next_tokens[:, None],
                    attention_mask=mask,
                    position_ids=self.positions[:, None],
                    use_cache=True,
                    **{self.cache_name: self.cache},
                )
            tokens = self._sample(self.rows, out.logits[:, -1, :])
        except Exception as exc:  # every request in the batch gets the error; the engine goes on
            self.fail(exc)
            return
        self.mask = mask
        self.positions = self.positions + 1
        self.next_tokens = torch.tensor(tokens, dtype=torch.long, device=self.mask.device)
        keep = [i for i, (row, token) in enumerate(zip(self.rows, tokens)) if not self._advance(row, token)]
        if len(keep) < len(self.rows):
            self._keep(keep)

    def cancel_all(self) -> None:
        for row in self.rows:
            row.job.cancel()

    def fail(self, exc: BaseException) -> None:
        """Finish every row with ``exc`` and empty the batch."""
        for row in self.rows:
            if not row.job.done.is_set():
                row.job.finish(error=exc)
        self._keep([])

    # ---- helpers -----------------------------------------------------------------------------------------

    def _sample(self, rows: list[Row], logits: Any) -> list[int]:
        """The next token of each row from its logits (float32, as ``model.generate`` computes them)."""
        import torch

        logits = logits.float()
        if all(row.options.greedy and not row.processors for row in rows):
            return logits.argmax(dim=-1).tolist()
        tokens = []
        for i, row in enumerate(rows):
            scores = logits[i : i + 1]
            if row.processors:
                seen = torch.tensor([row.job.prompt_ids + row.ids], dtype=torch.long, device=scores.device)
                for processor in row.processors:
                    scores = processor(seen, scores)
            if row.options.greedy:
                tokens.append(int(scores.argmax(dim=-1)))
            else:
                probs = torch.softmax(scores, dim=-1).cpu()
                tokens.append(int(torch.multinomial(probs, 1, generator=row.generator)))
        return tokens

    def _advance(self, row: Row, token: int) -> bool:
        """Record ``token`` for ``row``; returns whether the row is done (and then finishes its job)."""
        row.ids.append(token)
        row.stream.put([token])
        done = token == self.eos or len(row.ids) >= row.limit
        if not done and row.stops:
            tail = self.tokenizer.decode(row.ids[-row.stop_window :], skip_special_tokens=False)
            done = any(stop in tail for stop in row.stops)
        if done:
            self._end(row)
        return done

    def _end(self, row: Row, early: bool = False) -> None:
        if row.job.cancelled.is_set():
            row.job.finish(error=Cancelled())
            return
        options = row.options
        if row.limit < options.max_new_tokens and not early:  # cut by the context, not by max_new_tokens
            early = True
        row.stream.end()
        row.job.finish(
            finished_generation(self.tokenizer, row.ids, options, row.prompt_length, stopped_early=early)
        )

    def _keep(self, keep: list[int]) -> None:
        """Keep only the rows ``keep`` (indices); drop cache columns that are padding in every row left."""
        import torch

        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.positions = self.next_tokens = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int(mask.any(dim=0).nonzero()[0])
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.positions = self.positions.index_select(0, index)
        self.next_tokens = self.next_tokens.index_select(0, index)


def _left_pad(tensor: Any, length: int, dim: int = 2) -> Any:
    """``tensor`` with zeros added before its entries along ``dim`` up to ``length``."""
    import torch

    missing = length - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
