"""Sentence embeddings through transformers, and the batcher that embeds concurrent requests together.

The model (all-MiniLM-L6-v2 in the demo bundle, or any sentence-transformers model of the same
shape: a BERT-like encoder with a tokenizer) is read with transformers; an input's embedding is the
mean of its last hidden states over its tokens, L2-normalised, as sentence-transformers computes it
for these models. Every input is tokenized with the model's own special tokens and never truncated:
the serving layer refuses an input over the model's length before it gets here.

`Embedder` owns one thread: it loads the model (so torch's OpenMP team belongs to that thread alone,
see appliance/engines/__init__.py) and then takes inputs from a bounded queue, from one request or
several, waiting up to `wait_s` after the first for others to share its batch, up to `max_batch`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import EmbeddingsConfig
from appliance.engines.scheduler import QueueFull
from appliance.errors import EngineError
from appliance.paths import Layout

log = logging.getLogger("appliance.embeddings")
Vectors = list[Any]  # one float32 numpy vector per input, in input order
Done = Callable[[Vectors | BaseException], None]


def _may_map_executable() -> bool:
    """Whether this process may map memory both writable and executable (systemd's
    MemoryDenyWriteExecute, or the kernel's PR_SET_MDWE, refuse it)."""
    import mmap

    try:
        probe = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return False
    probe.close()
    return True


class EmbeddingModel:
    """A sentence-embedding model on one device: token ids in, unit vectors out."""

    def __init__(self, path: Path, *, device: str = "cpu", dtype: str = "float32", threads: int | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.torch = torch
        if device == "cuda" and not torch.cuda.is_available():
            raise EngineError("[embeddings] device is cuda, but torch sees no CUDA GPU here.",
                              "Set [embeddings] device = \"cpu\", or check the GPUs with `appliance hw`.")
        if device == "cpu" and threads:
            torch.set_num_threads(threads)
        if device == "cpu" and not _may_map_executable():
            # The llama.cpp CPU tier's server unit sets MemoryDenyWriteExecute: oneDNN, which
            # compiles its kernels at run time, cannot create one there ("could not create a
            # primitive"). torch's own kernels need no such memory.
            log.info("no writable+executable memory in this process: embeddings run without oneDNN")
            torch.backends.mkldnn.enabled = False  # type: ignore[assignment]
        self.device = device
        try:
            self.tok = AutoTokenizer.from_pretrained(path)
            model = AutoModel.from_pretrained(path, dtype=getattr(torch, dtype))
        except (OSError, ValueError) as e:
            raise EngineError(f"transformers could not load the embedding model in {path}: {e}".rstrip(".") + ".") from None
        self.model = model.to(device).eval()  # type: ignore[arg-type]
        self.dimensions = int(model.config.hidden_size)
        self.pad = int(self.tok.pad_token_id or 0)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids with the model's special tokens ([CLS] … [SEP]), untruncated."""
        return [list(ids) for ids in self.tok(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]

    def embed(self, batch: list[list[int]]) -> Vectors:
        """One forward pass over `batch` (right-padded to its longest); each row's mean-pooled unit vector."""
        torch = self.torch
        longest = max(len(ids) for ids in batch)
        ids = torch.tensor([x + [self.pad] * (longest - len(x)) for x in batch], device=self.device)
        mask = torch.tensor([[1] * len(x) + [0] * (longest - len(x)) for x in batch], device=self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        unit = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return list(unit.cpu().numpy())


@dataclass
class _Job:
    inputs: list[list[int]]
    done: Done
    vectors: list[Any] = field(default_factory=list)
    remaining: int = 0

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.inputs)
        self.remaining = len(self.inputs)


def _deliver(job: _Job, out: Vectors | BaseException) -> None:
    # A callback that fails (its event loop gone at shutdown) must not stop the thread the others wait on.
    try:
        job.done(out)
    except Exception:
        log.exception("could not hand an embedding result back")


class Embedder:
    """The batcher: a bounded queue of inputs and the one thread that embeds them."""

    def __init__(self, load: Callable[[], EmbeddingModel], *, max_batch: int, wait_s: float, max_queue: int,
                 on_batch: Callable[[int, int], None] = lambda _inputs, _tokens: None) -> None:
        self._load, self.max_batch, self.wait_s, self.max_queue = load, max_batch, wait_s, max_queue
        self.on_batch = on_batch  # (inputs, tokens) of each batch embedded: the metrics
        self.model: EmbeddingModel | None = None
        self._queue: deque[tuple[_Job, int]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="embedder", daemon=True)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._thread.start()

    def wait_loaded(self, timeout: float = 600.0) -> EmbeddingModel:
        """Block until the thread loaded the model; its loading error, raised here."""
        if not self._loaded.wait(timeout):
            raise EngineError(f"The embedding model did not load within {timeout:.0f} s.")
        if self._load_error is not None:
            raise self._load_error
        assert self.model is not None
        return self.model

    def warm_up(self, timeout: float = 600.0) -> str:
        """Wait for the model, then embed one input through the queue, as a request would."""
        model = self.wait_loaded(timeout)
        got: list[Vectors | BaseException] = []
        finished = threading.Event()

        def done(out: Vectors | BaseException) -> None:
            got.append(out)
            finished.set()

        self.submit(model.tokenize(["warm-up"]), done)
        if not finished.wait(timeout):
            raise EngineError(f"The embedding model did not embed a warm-up input within {timeout:.0f} s.")
        if isinstance(got[0], BaseException):
            raise EngineError(f"The embedding model failed its warm-up: {got[0]}")
        return f"{model.dimensions} dimensions on {model.device}"

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, inputs: list[list[int]], done: Done) -> None:
        """Queue one request's inputs; `done` gets their vectors (or the error) on the embedder's thread."""
        with self._cv:
            if self._closing:
                raise EngineError("The embedder is shutting down.")
            if len(self._queue) + len(inputs) > self.max_queue:
                raise QueueFull(f"{len(self._queue)} inputs are already waiting.")
            job = _Job(inputs, done)
            self._queue.extend((job, i) for i in range(len(inputs)))
            self._cv.notify_all()

    def _run(self) -> None:
        try:
            self.model = self._load()
        except BaseException as e:  # noqa: BLE001  (handed to wait_loaded, which raises it)
            self._load_error = e
        self._loaded.set()
        if self.model is None:
            return
        while (batch := self._next_batch()) is not None:
            self._embed(batch)

    def _next_batch(self) -> list[tuple[_Job, int]] | None:
        """Wait for an input, then up to wait_s for the batch to fill; None when closing."""
        with self._cv:
            while not self._queue and not self._closing:
                self._cv.wait()
            if self._closing:
                return None
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch and not self._closing and (left := deadline - time.monotonic()) > 0:
                self._cv.wait(left)
            return [self._queue.popleft() for _ in range(min(self.max_batch, len(self._queue)))]

    def _embed(self, batch: list[tuple[_Job, int]]) -> None:
        assert self.model is not None
        batch.sort(key=lambda item: len(item[0].inputs[item[1]]))  # neighbours of like length pad least
        try:
            vectors = self.model.embed([job.inputs[i] for job, i in batch])
        except Exception as e:  # one failed batch fails its requests, not the thread
            for job in {id(j): j for j, _ in batch}.values():
                if job.remaining >= 0:
                    job.remaining = -1
                    _deliver(job, e)
            return
        self.on_batch(len(batch), sum(len(job.inputs[i]) for job, i in batch))
        for (job, i), vector in zip(batch, vectors, strict=True):
            if job.remaining < 0:
                continue
            job.vectors[i] = vector
            job.remaining -= 1
            if job.remaining == 0:
                _deliver(job, job.vectors)


def load_embedder(config: EmbeddingsConfig, layout: Layout, on_batch: Callable[[int, int], None]) -> Embedder:
    """The configured embedding model behind its batcher; not started (start() loads it on its thread)."""
    path = config.resolve_path(layout)
    if not path.is_dir():
        raise EngineError(f"The embedding model {path} is not a directory.",
                          "Install a bundle whose tier names an embedding model, or fix [embeddings] path.")

    def load() -> EmbeddingModel:
        return EmbeddingModel(path, device=config.device, dtype=config.dtype, threads=config.threads)

    return Embedder(load, max_batch=config.max_batch, wait_s=config.batch_wait_ms / 1000, max_queue=config.max_queue,
                    on_batch=on_batch)
