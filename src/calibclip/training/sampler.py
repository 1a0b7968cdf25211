"""The dual-curriculum batch sampler.

Definition (also in docs/training.md):

- An *item* is one training image with one of its captions, drawn afresh each epoch.
- Levels: at epoch ``e`` (1-based) the image hardness is ``h_img = step * #{x in image_curriculum_epochs : x <= e}``
  and the text hardness ``h_txt = step * #{x in text_curriculum_epochs : x <= e}``; ``h = 0`` is random batches.
- Each batch of ``B`` holds ``n_img = round(h_img * B)`` image neighbours, ``n_txt = round(h_txt * B)`` text
  neighbours and ``A = B - n_img - n_txt`` anchors. Anchors are read in order from a random permutation of the
  items (a new permutation when one is used up). Image-neighbour slot ``j`` takes, for anchor ``j mod A``, the
  nearest not-yet-in-the-batch item of that anchor's image-neighbour list (cosine similarity of image
  embeddings); text slots do the same with the caption embeddings of the epoch's captions. Neighbour lists hold
  the ``k`` nearest items of a *different* identity (they are hard negatives, never positives). If a list is used
  up the slot takes a random item not in the batch (counted as ``fallback``).
- Neighbour tables are computed from the model's embeddings at the start of every epoch whose level is > 0.
- An epoch has ``floor(N / B)`` steps whatever the hardness, so schedules do not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Slot kinds in a batch plan.
ANCHOR, IMAGE_NEIGHBOUR, TEXT_NEIGHBOUR, FALLBACK = 0, 1, 2, 3


@dataclass
class CurriculumSchedule:
    """When the hardness steps up (epochs are 1-based) and by how much."""

    image_epochs: Sequence[int] = ()
    text_epochs: Sequence[int] = ()
    step: float = 0.125
    neighbours: int = 16

    def __post_init__(self) -> None:
        for name, epochs in (
            ("image_curriculum_epochs", self.image_epochs),
            ("text_curriculum_epochs", self.text_epochs),
        ):
            if any(int(e) < 1 for e in epochs):
                raise ValueError(f"model.dcc.{name} must list epochs >= 1, got {list(epochs)}")
        if not 0 <= self.step <= 1:
            raise ValueError(f"model.dcc.hardness_step must be in [0, 1], got {self.step}")
        top = self.step * (len(self.image_epochs) + len(self.text_epochs))
        if top >= 1:
            raise ValueError(
                f"model.dcc: hardness_step {self.step} x {len(self.image_epochs) + len(self.text_epochs)} curriculum "
                f"steps = {top:.2f} >= 1 leaves no anchors in a batch; lower hardness_step or list fewer epochs"
            )
        if self.neighbours < 1:
            raise ValueError(f"model.dcc.neighbours must be >= 1, got {self.neighbours}")

    def levels(self, epoch: int) -> tuple[float, float]:
        """``(h_img, h_txt)`` at ``epoch``."""
        return (
            self.step * sum(1 for e in self.image_epochs if int(e) <= epoch),
            self.step * sum(1 for e in self.text_epochs if int(e) <= epoch),
        )

    def counts(self, epoch: int, batch_size: int) -> tuple[int, int]:
        h_img, h_txt = self.levels(epoch)
        return round(h_img * batch_size), round(h_txt * batch_size)


def neighbour_table(
    embeddings: torch.Tensor, k: int, identities: torch.Tensor | None = None, chunk: int = 2048
) -> torch.Tensor:
    """``[N, k]`` indices of each row's ``k`` most cosine-similar rows (self and same identity excluded;
    ``-1`` pads when fewer exist), nearest first; ties broken by the lower index."""
    x = F.normalize(embeddings.float(), dim=-1)
    n = x.shape[0]
    k_eff = min(k, n - 1)
    out = torch.full((n, k), -1, dtype=torch.long)
    if k_eff <= 0:
        return out
    ids = identities if identities is not None else torch.arange(n)
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.t()
        rows = torch.arange(s, min(n, s + chunk))
        bad = ids[rows][:, None] == ids[None, :]
        bad[torch.arange(len(rows)), rows] = True
        sim = sim.masked_fill(bad, float("-inf"))
        # stable: sort by (-sim, index)
        val, idx = torch.sort(-sim, dim=1, stable=True)
        idx, val = idx[:, :k_eff], val[:, :k_eff]
        idx = torch.where(torch.isinf(val), torch.full_like(idx, -1), idx)
        out[s : s + len(rows), :k_eff] = idx
    return out


def plan_epoch(
    n_items: int,
    batch_size: int,
    n_img: int,
    n_txt: int,
    generator: torch.Generator,
    image_table: torch.Tensor | None = None,
    text_table: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batches of one epoch: ``(items [steps, B], kinds [steps, B])`` (see the module doc)."""
    if batch_size < 2:
        raise ValueError(f"batch size must be >= 2, got {batch_size}")
    if n_items < batch_size:
        raise ValueError(
            f"the training split has {n_items} images, fewer than the batch size {batch_size}; lower --batch-size"
        )
    anchors_per_batch = batch_size - n_img - n_txt
    if anchors_per_batch < 1:
        raise ValueError(f"{n_img} + {n_txt} neighbours leave no anchor in a batch of {batch_size}")
    if n_img and image_table is None or n_txt and text_table is None:
        raise ValueError("a curriculum level > 0 needs its neighbour table")
    steps = n_items // batch_size
    items = torch.empty(steps, batch_size, dtype=torch.long)
    kinds = torch.empty(steps, batch_size, dtype=torch.long)
    stream: list[int] = []
    pos = 0
    for step in range(steps):
        in_batch: set[int] = set()
        row: list[int] = []
        kind: list[int] = []
        while len(row) < anchors_per_batch:
            if pos >= len(stream):
                stream, pos = torch.randperm(n_items, generator=generator).tolist(), 0
            item = stream[pos]
            pos += 1
            if item not in in_batch:
                in_batch.add(item)
                row.append(item)
                kind.append(ANCHOR)
        anchors = list(row)
        for table, count, slot_kind in ((image_table, n_img, IMAGE_NEIGHBOUR), (text_table, n_txt, TEXT_NEIGHBOUR)):
            if not count:
                continue
            pointer = [0] * len(anchors)
            for j in range(count):
                a = j % len(anchors)
                cands = table[anchors[a]].tolist()  # type: ignore[index]
                chosen = -1
                while pointer[a] < len(cands):
                    c = cands[pointer[a]]
                    pointer[a] += 1
                    if c >= 0 and c not in in_batch:
                        chosen = c
                        break
                k = slot_kind
                if chosen < 0:
                    free = [i for i in torch.randperm(n_items, generator=generator).tolist() if i not in in_batch]
                    chosen, k = free[0], FALLBACK
                in_batch.add(chosen)
                row.append(chosen)
                kind.append(k)
        items[step] = torch.tensor(row)
        kinds[step] = torch.tensor(kind)
    return items, kinds
