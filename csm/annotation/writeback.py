"""Label writing in the decoding workers: the main process of ``csm annotate`` keeps the forward.

Annotating a shard ends in two writes: its label file (``annotations/NAME/labels-*.arrow``) and,
when the annotation is activated, its main shard rewritten with the new labels. Done in the main
process after the last forward they cost ~45 ms per 10,000 images, ~4% of a small encoder's
forward (issue 17, ``bench/RESULTS.md``); in a thread of the main process they gain nothing (the
thread and the forward's Python layer share the GIL). So the DataLoader workers that decode the
shards write them too: the main process sends each shard's labels back through one queue as soon
as they are computed; a worker takes what has arrived before it decodes its next shard, and each
worker's last item (a *flush* item, :meth:`WriteBack.flush`) waits for the rest until the main
process's end-of-labels mark.

Everything the workers write is staged under content-addressed names
(:func:`~csm.synthetic.variants.stage_label_file`, :func:`~csm.synthetic.variants.stage_shard`),
which only the commit in the main process references; after a failure or a kill,
:func:`~csm.synthetic.variants.recover` removes it. The files are byte-identical to those the
main process writes (the same functions on the same labels), whatever the number of workers.
Used only where each shard's labels are final once it is encoded (not ``pair-fit``, fitted on
all shards at the end) and in one-process runs (under ``accelerate launch`` the main process
writes).
"""

from __future__ import annotations

import os
import queue as queue_module
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csm.errors import CSMError
from csm.synthetic.variants import label_columns_of, label_table, stage_label_file, stage_shard

__all__ = ["LABEL_KEYS", "WriteBack"]

#: The columns of a shard's labels that the workers need (from an ``_encode_shards`` entry).
LABEL_KEYS = ("group_id", "share", "lam_hat", "class_a", "class_b")

#: Written: (shard position, label file record, staged main shard record or ``None``).
Written = tuple[int, dict[str, Any], dict[str, Any] | None]


@dataclass
class WriteBack:
    """What the decoding workers need to write the shards' labels, and the queue they come by.

    Attributes:
        dataset: The synthetic dataset.
        name: The annotation's name.
        class_names: Its class names.
        records: Every image shard's record, in order (a shard is named by its position).
        activate: Also stage the relabelled main shards.
        workers: The number of decoding workers (one flush item each).
        queue: ``(position, labels)`` per shard, then one ``None`` per worker; a
            ``multiprocessing`` queue made before the workers are forked.
        received: Main process: what the workers wrote, as it comes back.
        parent: The annotating process (a worker whose parent changes stops waiting).
    """

    dataset: Path
    name: str
    class_names: list[str]
    records: list[dict[str, Any]]
    activate: bool
    workers: int
    queue: Any = field(repr=False)
    received: list[Written] = field(default_factory=list, repr=False)
    parent: int = field(default_factory=os.getpid, repr=False)

    def send(self, i: int, result: dict[str, Any]) -> None:
        """Main process: shard ``i``'s labels are computed."""
        self.queue.put((i, {k: result[k] for k in LABEL_KEYS}))

    def end(self) -> None:
        """Main process: every shard's labels are sent (one end mark per worker)."""
        for _ in range(self.workers):
            self.queue.put(None)

    def write(self, i: int, labels: dict[str, Any]) -> Written:
        """Stage shard ``i``'s label file and, when activating, its relabelled main shard."""
        record = self.records[i]
        cols = (labels[k] for k in LABEL_KEYS)
        table = label_table(self.class_names, *cols)
        n = len(self.records)
        file = stage_label_file(self.dataset, self.name, record, table, n)
        if not self.activate:
            return i, file, None

        def labels_for(main: Any) -> dict[str, Any]:
            return label_columns_of(table, main, self.name, record["shard"])

        return i, file, stage_shard(self.dataset, self.class_names, record, n, labels_for)

    def take(self) -> list[Written]:
        """Worker: write the labels that have arrived, without waiting."""
        out = []
        while True:
            try:
                msg = self.queue.get_nowait()
            except queue_module.Empty:
                return out
            if msg is None:  # another worker's end mark: leave it for that worker
                self.queue.put(None)
                return out
            out.append(self._write_message(msg))

    def flush(self) -> list[Written]:
        """Worker: write every label still to come, until an end mark.

        Raises:
            CSMError: The main process is gone (killed): the worker stops instead of waiting for
                labels that never come.
        """
        out = []
        while True:
            try:
                msg = self.queue.get(timeout=1.0)
            except queue_module.Empty:
                if os.getppid() != self.parent:
                    raise CSMError("the annotating process is gone; stopping") from None
                continue
            if msg is None:
                return out
            out.append(self._write_message(msg))

    def _write_message(self, msg: tuple[int, dict[str, Any]]) -> Written:
        i, labels = msg
        try:
            return self.write(i, labels)
        except CSMError:
            raise
        except Exception as exc:  # e.g. a full disk: one line in the main process
            raise CSMError(
                f"{self.dataset}: writing the labels of shard {i} failed: {exc}"
            ) from exc
