"""The outer step's collectives on an MPI communicator of their own (hparam outer_overlap), so
that the exchange between nodes runs from a thread beside the node's steps.

Horovod runs every collective of a process on one background thread, in turn: an outer exchange
through Horovod would hold up the next steps' exchanges until it is done. Under an MPI launch
(horovodrun --mpi, mpirun, srun with PMIx) Horovod's MPI controller initialises MPI with
MPI_THREAD_MULTIPLE, so a second communicator (the ranks at this rank's position in every node,
split from the world) can carry the outer exchange from another thread at the same time. Its
collectives are MPI's nonblocking ones, tested every millisecond: a blocking call would spin on
a core the steps need. MPI's lifetime stays Horovod's (mpi4py neither initialises nor finalises).

The same interface as exchange.collectives.Across: rank, size, maximum, average, alltoall,
allgather, on TensorFlow tensors.
"""
import time

import mpi4py
import numpy as np
import tensorflow as tf

mpi4py.rc.initialize = False  # Horovod's MPI controller did, with MPI_THREAD_MULTIPLE
mpi4py.rc.finalize = False
from mpi4py import MPI  # noqa: E402 (after the settings it reads when imported)
from mpi4py.util.dtlib import from_numpy_dtype  # noqa: E402

POLL_SECONDS = 0.001


def can_run_beside_horovod():
    """Why the outer exchange cannot run on a communicator of its own here, or '' when it can."""
    if not MPI.Is_initialized():
        return "MPI is not initialised (a Gloo launch)"
    if MPI.Query_thread() < MPI.THREAD_MULTIPLE:
        return "MPI runs without MPI_THREAD_MULTIPLE (HOROVOD_MPI_THREADS_DISABLE?)"
    return ""


class MpiAcross:
    """The ranks at position `position` of every node, `node` this one's index: MPI's world
    split by position, ordered by node. A collective to make."""

    def __init__(self, position, node):
        self.comm = MPI.COMM_WORLD.Split(color=position, key=node)
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def _wait(self, request):
        while not request.Test():
            time.sleep(POLL_SECONDS)

    def maximum(self, tensor):
        values = np.ascontiguousarray(tensor.numpy())
        out = np.empty_like(values)
        self._wait(self.comm.Iallreduce(values, out, op=MPI.MAX))
        return tf.constant(out)

    def average(self, tensors, fp16=False):
        """The average over the ranks of each tensor: summed in float32 after travelling in fp16
        (alltoall of a range of the values to each rank, allgather of the sums) or in float32."""
        values = np.concatenate([np.ravel(tensor.numpy()) for tensor in tensors]).astype(np.float32)
        if fp16:
            ranges = np.array_split(np.arange(values.size), self.size)
            splits = [len(part) for part in ranges]
            # fp16 as its bits (uint16): moved, never reduced by MPI
            received = self._alltoallv(values.astype(np.float16).view(np.uint16), splits,
                                       [splits[self.rank]] * self.size).view(np.float16)
            mine = received.reshape(self.size, -1).astype(np.float32).sum(axis=0) / self.size
            summed = self._allgatherv(mine.astype(np.float16).view(np.uint16), splits).view(np.float16)
            summed = summed.astype(np.float32)
        else:
            summed = np.empty_like(values)
            self._wait(self.comm.Iallreduce(values, summed, op=MPI.SUM))
            summed /= self.size
        out, start = [], 0
        for tensor in tensors:
            count = tensor.shape.num_elements()
            out.append(tf.constant(summed[start:start + count].reshape(tensor.shape)))
            start += count
        return out

    def alltoall(self, tensor, splits):
        """Rows `splits[r]` of the 1-D `tensor` to rank r: (what came back, in rank order, its
        splits)."""
        counts = np.empty(self.size, np.int64)
        self._wait(self.comm.Ialltoall(np.array(splits, np.int64), counts))
        received = self._alltoallv(tensor.numpy(), list(splits), list(counts))
        return tf.constant(received), [int(count) for count in counts]

    def allgather(self, tensor):
        """Every rank's 1-D `tensor`, in rank order."""
        counts = np.empty(self.size, np.int64)
        self._wait(self.comm.Iallgather(np.array([tensor.shape[0]], np.int64), counts))
        return tf.constant(self._allgatherv(tensor.numpy(), list(counts)))

    def _alltoallv(self, values, send_counts, receive_counts):
        values = np.ascontiguousarray(values)
        received = np.empty(sum(receive_counts), values.dtype)
        send_offsets, receive_offsets = np.cumsum([0, *send_counts[:-1]]), np.cumsum([0, *receive_counts[:-1]])
        self._wait(self.comm.Ialltoallv([values, (send_counts, send_offsets), _mpi_type(values)],
                                        [received, (receive_counts, receive_offsets), _mpi_type(values)]))
        return received

    def _allgatherv(self, values, counts):
        values = np.ascontiguousarray(values)
        received = np.empty(sum(counts), values.dtype)
        offsets = np.cumsum([0, *counts[:-1]])
        self._wait(self.comm.Iallgatherv([values, _mpi_type(values)],
                                         [received, (counts, offsets), _mpi_type(values)]))
        return received


def _mpi_type(values):
    return from_numpy_dtype(values.dtype)
