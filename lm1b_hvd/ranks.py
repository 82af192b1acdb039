"""The processes a piece of library code works with, as one object it is handed.

Library code that acts together with other ranks (a checkpoint every rank writes into, an
evaluation whose sums every rank adds to, a decision every rank must take alike) takes a `Ranks`
instead of calling Horovod: one process here, with no Horovod import, so that `score`, `sample`
and `export` load a model without the distributed stack; exchange.collectives.HorovodRanks is
the same interface over Horovod's ranks (or one of its process sets).
"""


class Ranks:
    """One process alone: rank 0 of 1, every collective the identity."""
    rank = 0
    size = 1

    @property
    def is_root(self):
        return self.rank == 0

    def any(self, flag):
        """Whether `flag` is true on any rank."""
        return bool(flag)

    def root_decides(self, value):
        """Rank 0's picklable `value`, on every rank."""
        return value

    def gather_objects(self, value):
        """Every rank's picklable `value`, rank by rank, on every rank."""
        return [value]

    def gather_numbers(self, numbers):
        """Every rank's list of numbers, rank by rank, as one list on every rank."""
        return [float(number) for number in numbers]

    def sum(self, tensor):
        """Elementwise sum of a tensor over the ranks (in a traced step too)."""
        return tensor

    def broadcast_from_root(self, variables):
        """Every rank holds rank 0's values of `variables` afterwards."""

    def in_lockstep(self, items, filler):
        """`items`, then `filler` for as long as another rank still has items of its own: for a
        loop of collectives that every rank must run as often (a vocabulary-parallel evaluation
        over shares of unequal length). One `any` per item."""
        items = iter(items)
        while True:
            item = next(items, None)
            if not self.any(item is not None):
                return
            yield filler if item is None else item


ONE_PROCESS = Ranks()
