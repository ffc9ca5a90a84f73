"""Server-side batching of concurrent requests (`--enable_batching`).

Like TF Serving's shared batch scheduler: tasks for the same servable, signature and input
layout join an open batch until it reaches `max_batch_size` or waits `batch_timeout_micros`;
`num_batch_threads` threads run batches, inputs concatenated on dim 0 (padded up to the next
`allowed_batch_sizes` entry) and outputs split back. At most `max_enqueued_batches` batches
wait per queue.
"""

import threading
import time
from collections import defaultdict, deque

import grpc
import numpy as np

from serving._errors import ServingError
from serving._metrics import DISABLED

_INVALID = grpc.StatusCode.INVALID_ARGUMENT


class BatchingOptions:
    """Scheduler settings, read from a `BatchingParameters` message with TF's defaults."""

    def __init__(self, params=None, num_cpus=2):
        def get(field, default):
            return getattr(params, field).value if params is not None and params.HasField(
                field) else default

        self.max_batch_size = get("max_batch_size", 1000)
        self.batch_timeout_s = get("batch_timeout_micros", 0) / 1e6
        self.max_enqueued_batches = get("max_enqueued_batches", 10)
        self.num_batch_threads = max(1, get("num_batch_threads", num_cpus))
        self.allowed_batch_sizes = list(params.allowed_batch_sizes) if params is not None else []
        if self.allowed_batch_sizes and self.allowed_batch_sizes[-1] != self.max_batch_size:
            raise ValueError("Last entry in allowed_batch_sizes must match max_batch_size; last "
                             f"entry was {self.allowed_batch_sizes[-1]}; expected "
                             f"{self.max_batch_size}")


class _Task:
    def __init__(self, feeds, size, deadline):
        self.feeds, self.size, self.deadline = feeds, size, deadline
        self.enqueued = time.monotonic()
        self.done = threading.Event()
        self.outputs = self.error = None


class _Batch:
    def __init__(self, run):
        self.run, self.tasks, self.size = run, [], 0
        self.created, self.closed = time.monotonic(), False


class Batcher:
    """Batches `run(servable, signature, feeds)` calls across threads.

    Args:
        options: a `BatchingOptions`.
        run_signature: callable(servable, signature_name, feeds) -> outputs, run per batch.
        metrics: a `serving._metrics.Metrics` for the batching session's metrics (input and
            processed batch sizes, padding, queuing time, runs).
    """

    def __init__(self, options, run_signature, metrics=DISABLED):
        self.options = options
        self.metrics = metrics
        self._run_signature = run_signature
        self._queues = defaultdict(deque)
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def run(self, servable, signature_name, feeds, deadline=None):
        """Queues one request's `feeds` and blocks until its slice of the batch is back.

        Raises:
            ServingError: rows 17-19 of the spec, DEADLINE_EXCEEDED if the deadline passed
                before the batch ran, or the batch's own error.
        """
        sizes = set()
        for array in feeds.values():
            if np.ndim(array) == 0:
                raise ServingError(_INVALID, "Batching Run() input tensors must have at least "
                                             "one dimension")
            sizes.add(array.shape[0])
        if len(sizes) != 1:
            raise ServingError(_INVALID, "Batching Run() input tensors must have equal "
                                         "0th-dimension size")
        # Before the size check, like BatchingSession::ComputeInputSize: once per input.
        self.metrics.batch_task([array.shape[0] for array in feeds.values()])
        size = sizes.pop()
        if size > self.options.max_batch_size:
            raise ServingError(_INVALID, f"Task size {size} is larger than maximum input batch "
                                         f"size {self.options.max_batch_size}")
        key = (id(servable), signature_name) + tuple(
            (alias, feeds[alias].dtype.str, feeds[alias].shape[1:]) for alias in sorted(feeds))
        task = _Task(feeds, size, deadline)
        with self._cond:
            queue = self._queues[key]
            open_batch = queue[-1] if queue and not queue[-1].closed else None
            if open_batch and open_batch.size + size <= self.options.max_batch_size:
                batch = open_batch
            else:
                if len(queue) >= self.options.max_enqueued_batches:
                    raise ServingError(grpc.StatusCode.UNAVAILABLE,
                                       "The batch scheduling queue to which this task was "
                                       "submitted is full")
                if queue:
                    queue[-1].closed = True
                batch = _Batch(lambda f: self._run_signature(servable, signature_name, f))
                queue.append(batch)
            batch.tasks.append(task)
            batch.size += size
            if batch.size >= self.options.max_batch_size:
                batch.closed = True
            self._cond.notify()
        task.done.wait()
        if task.error is not None:
            raise task.error
        return task.outputs

    def stop(self):
        """Runs what is queued, then stops the batch threads."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=30)

    def _next_batch(self):
        with self._cond:
            while True:
                now, wait = time.monotonic(), None
                for key, queue in list(self._queues.items()):
                    if not queue:
                        del self._queues[key]
                        continue
                    head = queue[0]
                    ready_at = head.created + self.options.batch_timeout_s
                    if head.closed or now >= ready_at or self._stopping:
                        queue.popleft()
                        return head
                    wait = ready_at - now if wait is None else min(wait, ready_at - now)
                if self._stopping:
                    return None
                self._cond.wait(wait)

    def _work(self):
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _execute(self, batch):
        now = time.monotonic()
        tasks = []
        for task in batch.tasks:
            self.metrics.batch_queued(now - task.enqueued)
            if task.deadline is not None and task.deadline <= now:
                task.error = ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                          "Deadline exceeded before the batch ran")
                task.done.set()
            else:
                tasks.append(task)
        if not tasks:
            return
        total = sum(t.size for t in tasks)
        padded = next((s for s in self.options.allowed_batch_sizes if s >= total), total)
        self.metrics.batch_run(padded, padded - total)
        try:
            feeds = {}
            for alias in tasks[0].feeds:
                merged = np.concatenate([t.feeds[alias] for t in tasks])
                if padded > total:
                    merged = np.concatenate([merged, np.repeat(merged[:1], padded - total, 0)])
                feeds[alias] = merged
            outputs = batch.run(feeds)
            for alias, value in outputs.items():
                if np.ndim(value) == 0 or value.shape[0] != padded:
                    raise ServingError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        "Batched output tensor's 0th dimension does not equal the sum of the "
                        f"0th dimension sizes of the input tensors (output {alias})")
            start = 0
            for task in tasks:
                task.outputs = {a: v[start:start + task.size] for a, v in outputs.items()}
                start += task.size
        except ServingError as e:
            for task in tasks:
                task.error = e
        except Exception as e:  # Any failure must reach every waiting request.
            for task in tasks:
                task.error = ServingError(grpc.StatusCode.INTERNAL, str(e))
        for task in tasks:
            task.done.set()
