r"""Fresh CPU memory for the in-memory recorder's copies of :math:`\theta_{s+1}`, page-faulted off the hot path.

An in-memory run keeps every :math:`\theta_{s+1}`, so each step needs new memory of the size of
the recorded parameters. The first write to freshly allocated CPU memory pays one page fault per
4 KiB page, about ten times the copy itself for a parameter-sized tensor (docs/recording.md,
"Recording overhead"). :class:`WarmBuffers` allocates the buffers of the next steps on a daemon
thread and writes zeros into them there, so the training loop's thread only copies
:math:`\theta_{s+1}` into memory that is already mapped. When no set is ready (the thread is
behind), the copy is a plain ``clone()``, as without it: the values are the same either way.
"""

from __future__ import annotations

import logging
import queue
import threading

import torch
from torch import Tensor

__all__ = ["WarmBuffers"]

logger = logging.getLogger(__name__)


class WarmBuffers:
    """Sets of zero-filled tensors shaped like ``like``, made ahead by a daemon thread (CPU tensors only).

    Parameters
    ----------
    like : dict of str to Tensor
        The tensors whose copies are wanted (shapes and dtypes; those on another device are cloned).
    depth : int
        Sets kept ready, at most (each holds one copy of every CPU tensor of ``like``).
    """

    def __init__(self, like: dict[str, Tensor], depth: int = 2):
        self._specs = {n: (tuple(t.shape), t.stride(), t.dtype) for n, t in like.items() if t.device.type == "cpu"}
        self._ready: queue.Queue[dict[str, Tensor]] = queue.Queue(maxsize=max(1, int(depth)))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.misses = 0  # copies made with clone() because no set was ready
        if self._specs:
            self._thread = threading.Thread(target=self._fill, name="explaind-warm-buffers", daemon=True)
            self._thread.start()

    def _fill(self) -> None:
        try:
            while not self._stop.is_set():
                # zero_() touches every page here, not on the training loop's thread
                bufs = {n: torch.empty_strided(shape, stride, dtype=dtype).zero_()
                        for n, (shape, stride, dtype) in self._specs.items()}
                while not self._stop.is_set():
                    try:
                        self._ready.put(bufs, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except Exception:  # out of memory here: the loop's thread clones instead
            logger.debug("Allocating warm buffers failed; theta is cloned on the loop's thread.", exc_info=True)

    def copies(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        """Detached copies of ``tensors`` (same keys as ``like``): into a ready set where there is one, else clones."""
        try:
            bufs = self._ready.get_nowait()
        except queue.Empty:
            bufs = {}
            if self._specs:
                self.misses += 1
        out = {}
        for name, t in tensors.items():
            buf = bufs.get(name)
            if (buf is None or buf.shape != t.shape or buf.stride() != t.stride() or buf.dtype != t.dtype
                    or t.device.type != "cpu"):
                out[name] = t.detach().clone()
            else:
                out[name] = buf.copy_(t.detach())
        return out

    def close(self) -> None:
        """Stop the thread and drop the sets not handed out."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        while True:
            try:
                self._ready.get_nowait()
            except queue.Empty:
                return
