"""Dynamic batching for ``liverus serve``: requests that arrive within a few milliseconds of each other run through
the model as one batch, as Triton's and TorchServe's dynamic batchers do, and Grad-CAM is computed, batched too, only
for the requests that asked for a heatmap.

One worker thread owns the model; request threads hand it preprocessed images and wait on a future. A batch is closed
when it holds ``max_batch`` images or ``max_wait_ms`` after its first one arrived, so a lone request waits at most that
long and concurrent ones share the forward pass.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from liverus.data.preprocess import Preprocessed
from liverus.engine.predictor import Predictor

__all__ = ["DynamicBatcher", "BatchResult"]


@dataclass
class BatchResult:
    class_probabilities: np.ndarray  # every class's (the card's order; malignant last)
    heatmap: np.ndarray | None
    batch_size: int  # how many requests shared the forward pass

    @property
    def probability(self) -> float:
        """Of malignancy (the last class)."""
        return float(self.class_probabilities[-1])


class DynamicBatcher:
    """Batches predictions of one :class:`Predictor` across concurrent callers.

    Args:
        predictor: the loaded model.
        max_batch: the largest batch (1 disables batching: every request runs alone).
        max_wait_ms: how long a batch stays open after its first request.

    Raises:
        ValueError: for a batch size below 1 or a negative wait.
    """

    def __init__(self, predictor: Predictor, *, max_batch: int = 16, max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="liverus-batcher", daemon=True)
        self._worker.start()

    def submit(self, pre: Preprocessed, *, heatmap: bool = False) -> Future:
        """Queue one preprocessed image. Returns: a future of its :class:`BatchResult`."""
        fut: Future = Future()
        self._queue.put((pre, heatmap, fut))
        return fut

    def _next_batch(self) -> list:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                probs = self.predictor.class_probabilities([pre for pre, _, _ in batch])
                want = [i for i, (_, h, _) in enumerate(batch) if h]
                heats = self.predictor.heatmaps([batch[i][0] for i in want]) if want else []
                maps = dict(zip(want, heats, strict=True))
                for i, (_, _, fut) in enumerate(batch):
                    fut.set_result(BatchResult(probs[i], maps.get(i), len(batch)))
            except Exception as exc:  # the callers get the error; the worker keeps serving
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
