"""Counting threads: count batches of frames while the rank goes on receiving.

The counting kernels release the GIL, so ``n`` threads count ``n`` batches at
once and the thread that drains the sockets never stops for the length of a
batch. A batch is counted where its frames lie, in the frame pool (no copy: at
a few thousand frames/s that copy took the receiving thread 10-20 % of its
rate): its buffers go back to the pool when the counted batch is collected.
"""

from __future__ import annotations

import queue
import threading


class CountingThreads:
    """``n`` threads counting ``(share, slots, frame_number, position, mask)`` batches.

    :meth:`submit` hands a batch over (False when ``2 n`` batches already wait);
    :meth:`collect` returns the finished ``(share, slots, CountedFrames or exception)``.
    Each batch is counted with ``share.counting.count``, its frames read in place: the
    buffers ``slots`` of ``share.pool``, which the caller gives back once collected.
    """

    def __init__(self, n: int = 1, name: str = "fourdstream-counting"):
        if n < 1:
            raise ValueError(f"counting threads must be >= 1, got {n}")
        self._todo: queue.Queue = queue.Queue(maxsize=2 * n)
        self._done: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._main, name=f"{name}-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, share, slots, frame_number, position, mask) -> bool:
        """Queue one batch for counting; False (nothing queued) when the queue is full."""
        try:
            self._todo.put_nowait((share, slots, frame_number, position, mask))
        except queue.Full:
            return False
        share.in_flight += 1
        return True

    @property
    def full(self) -> bool:
        return self._todo.full()

    def collect(self) -> list[tuple]:
        """Finished batches: ``(share, slots, result)``, result a CountedFrames or the exception raised."""
        out = []
        while True:
            try:
                out.append(self._done.get_nowait())
            except queue.Empty:
                return out

    def stop(self) -> None:
        """Let the threads finish the queued batches and end."""
        for _ in self._threads:
            self._todo.put(None)

    def _main(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            share, slots, fn, pos, mask = item
            try:
                result = share.counting.count(share.pool.frames, fn, pos, mask, index=slots)
                if share.live is not None:
                    share.live.add(result)
            except BaseException as exc:   # handed back to the receiving thread
                result = exc
            self._done.put((share, slots, result))
