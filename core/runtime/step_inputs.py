"""A step's small input tensors (slots, positions, context lengths, block tables) sent to the
device in one non-blocking copy from pinned host memory.

Built one by one with torch.tensor(list, device=...) they are five pageable copies, each a host
sync on a GPU. Here they are packed into one pinned buffer (two, used in turn: a buffer is
written again only once the event recorded after its last copy has passed) and copied at once
into one device buffer, which the step then reads through views.
"""

from __future__ import annotations

import torch

ALIGN = 16          # byte alignment of each part inside the buffer (any dtype's view is aligned)


class PinnedUploader:
    def __init__(self, backend, buffers: int = 2):
        self.backend = backend
        self._host = [None] * buffers
        self._events = [None] * buffers
        self._turn = 0
        self.copies = 0                 # one per upload: what a test counts

    def upload(self, parts: list) -> list:
        """Device copies of the host tensors `parts` (any dtypes), through one pinned buffer."""
        offsets, total = [], 0
        for t in parts:
            offsets.append(total)
            total += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        i = self._turn
        self._turn = (i + 1) % len(self._host)
        self.backend.sync_event(self._events[i])        # its previous copy has left the buffer
        host = self._host[i]
        if host is None or host.numel() < total:     # grows geometrically with the batch
            size = max(total, 4096, 2 * (host.numel() if host is not None else 0))
            host = self._host[i] = self.backend.pinned_empty((size,), torch.uint8)
        for t, off in zip(parts, offsets):
            n = t.numel() * t.element_size()
            host[off:off + n].view(t.dtype).copy_(t.reshape(-1))
        dev = torch.empty((max(total, ALIGN),), dtype=torch.uint8, device=self.backend.device)
        self.backend.copy_to_device(dev[:total], host[:total])
        self._events[i] = self.backend.record_event()
        self.copies += 1
        out = []
        for t, off in zip(parts, offsets):
            n = t.numel() * t.element_size()
            out.append(dev[off:off + n].view(t.dtype).view(t.shape))
        return out
