"""Candidate search for the next step in a background thread, overlapped with the current step.

:meth:`BatchBuilder.propose` for step t + 1 needs only the builder's position
after step t's :meth:`~BatchBuilder.select` and the bank as it stood after
step t - 1. It can therefore run while step t's forward and backward passes
do, provided nothing changes the builder or the bank until it finishes.
:class:`BackgroundSearch` runs it in one worker thread, and the trainer
follows this protocol for every mined step t:

1. ``batch_t = builder.select(proposal_t, hardness)`` (the builder moves on).
2. ``search.submit(bank)`` unless the run ends after this step. This
   starts ``propose`` for step t + 1 against the current bank, which is the
   bank after step t - 1. When the epoch is finished, the worker's
   ``propose`` starts the next one.
3. Train on ``batch_t`` (forward, backward, optimizer step, reward proxy).
   Neither the builder nor the bank may be written while the search runs.
   Reading the bank is safe.
4. ``proposal_{t+1} = search.result()``, then ``bank.update(batch_t, ...)``.
   The bank is written only after the result is in.

Inline search gives the same proposals when it calls ``builder.propose(bank)``
at step 2 instead (same builder position, same bank), so a run with
``background_search`` on and off builds the same batches. Within an epoch the
order of ``bank.update`` and ``propose`` does not even matter: step t writes
only rows of pairs that step t placed, and ``propose`` reads only unplaced
pairs. Across an epoch boundary, the new epoch's first search reads the bank
before the last step's update in both modes.

The worker shares the CPU with the training step. On a GPU run the step
leaves the CPU mostly idle, so the search is hidden. On a CPU-only machine
both compete for the same cores and the gain is smaller.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from falcon_rl.mining.bank import EmbeddingBank
from falcon_rl.mining.batch import Proposal
from falcon_rl.mining.builder import BatchBuilder
from falcon_rl.mining.errors import MiningError

logger = logging.getLogger(__name__)


class BackgroundSearch:
    """Runs ``builder.propose(bank)`` in a single worker thread (see the module docstring for the protocol).

    Use it as a context manager, or call :meth:`close` when done.

    :param builder: the batch builder whose next proposal is searched.
    """

    def __init__(self, builder: BatchBuilder) -> None:
        self.builder = builder
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="falcon-rl-search")
        self._pending: Future[Proposal] | None = None

    @property
    def pending(self) -> bool:
        """Whether a submitted search has not been collected with :meth:`result` yet."""
        return self._pending is not None

    def submit(self, bank: EmbeddingBank) -> None:
        """Start ``propose`` for the next batch against the current contents of ``bank``.

        :raises MiningError: when the previous search was not collected.
        """
        if self._pending is not None:
            raise MiningError("a background search is still pending; call result() before submit()")
        if self._executor is None:
            raise MiningError("this BackgroundSearch is closed")
        self._pending = self._executor.submit(self.builder.propose, bank)

    def result(self, timeout: float | None = None) -> Proposal:
        """Wait for the submitted search and return its proposal.

        An exception raised by ``propose`` in the worker is raised here.

        :param timeout: seconds to wait; None waits as long as it takes.
        :raises MiningError: when nothing was submitted.
        """
        if self._pending is None:
            raise MiningError("no background search was submitted; call submit(bank) first")
        future, self._pending = self._pending, None
        return future.result(timeout=timeout)

    def close(self) -> None:
        """Wait for a running search to finish, discard its result and stop the worker thread."""
        if self._executor is None:
            return
        if self._pending is not None:
            logger.debug("closing a BackgroundSearch with an uncollected result")
            self._pending = None
        self._executor.shutdown(wait=True)
        self._executor = None

    def __enter__(self) -> BackgroundSearch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
