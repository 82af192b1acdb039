"""What crosses between the nodes at an outer step (update.outer): the nodes' mean of what each
changed since the last outer step, of the rows some node changed.

1. Which rows changed: one allreduce (max) of a float per owned row and averaged slot, 0 where
   this node did not change the row (its delta and its slots' increments 0, and nothing owed to
   it by the quantized exchange below), else the slot's largest increment.
2. The mean of those rows:
   - 16 bits (hparam outer_bits=16): one grouped allreduce (average) of the changed rows'
     deltas and averaged slots' increments, in fp16 with outer_fp16 (an increment divided by
     its row's largest, which fp16 could not hold otherwise), else fp32;
   - 8 or 4 bits: the deltas row-wise quantized (update.quantized) in two phases, as
     compressed allreduces do (1-bit Adam's): each node adds what its earlier roundings dropped
     (its residual), quantizes, and sends row range k of its rows to node k (alltoall); node k
     averages what it received in float32, adds its own residual of that range, quantizes
     again, and sends the result to every node (allgather). Every node then holds the same
     mean, and each node's two residuals carry what was dropped into the next outer step (error
     feedback). A row with a residual is a changed row, so that the result is the dense
     formula's for every row. The slots' increments travel as at 16 bits.

`across` is the set of ranks at this rank's position in every node, with the collectives
maximum, average, alltoall and allgather (exchange.collectives.Across).
"""
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd.model import tables
from lm1b_hvd.update import quantized

RESIDUAL_KEY = "outer_residual"  # outer_residual/{sent, received}/WEIGHT: a node's residuals, in its checkpoint copy


class OuterExchange(typing.NamedTuple):
    """What one rank's outer step sent between the nodes: its owned rows, how many of them some
    node had changed, and the bytes of the tensors it handed to the collectives, as an allreduce
    of that many bytes (the flags of the owned rows, then the changed rows): an allreduce of B
    bytes and an alltoall then allgather of B bytes each move 2 (N - 1) / N x B on a node's link."""
    rows_changed: int
    rows_owned: int
    across_bytes: int


class NodesMean:
    """The nodes' mean at outer steps of each of `parts` (update.outer_parts.OwnedPart) and its
    `averaged` slots (a list a part), over `across`, with hparams outer_bits and outer_fp16."""

    def __init__(self, parts, averaged, across, hps):
        self.parts, self.averaged_counts, self.across = parts, [len(slots) for slots in averaged], across
        self.bits, self.fp16 = hps.outer_bits, hps.outer_fp16
        self.sent_residuals, self.received_residuals, self.ranges = [], [], []
        if self.bits < 16:
            # What this node's roundings dropped: of the rows it sends (each owned row), and of
            # the rows it averages for the others (its range of each part's rows).
            for part in parts:
                shape = owned_shape(part)
                served = tables.owned_rows(shape[0], across.rank, across.size)
                self.sent_residuals.append(tf.Variable(tf.zeros(shape), trainable=False))
                self.received_residuals.append(tf.Variable(tf.zeros([served.count, *shape[1:]]), trainable=False))
                self.ranges.append([tables.owned_rows(shape[0], node, across.size) for node in range(across.size)])

    def mean(self, deltas, increments):
        """(each part's changed rows, the mean deltas [owned rows] (0 where no node changed a
        row), the mean increments of each averaged slot [changed rows], OuterExchange): a
        collective over `across`."""
        owed = self._owed_rows()
        changed, scales = self._union([row_scales(delta, slot_increments, owing)
                                       for delta, slot_increments, owing in zip(deltas, increments, owed)])
        if self.bits < 16:
            mean_deltas, delta_bytes = self._quantized_mean(deltas, changed)
            _, mean_increments, increment_bytes = self._averaged(deltas, increments, changed, scales, with_deltas=False)
        else:
            mean_deltas, mean_increments, delta_bytes = self._averaged(deltas, increments, changed, scales)
            increment_bytes = 0
        exchange = OuterExchange(rows_changed=sum(int(rows.shape[0]) for rows in changed),
                                 rows_owned=sum(part.rows.count for part in self.parts),
                                 across_bytes=4 * self.flag_count() + delta_bytes + increment_bytes)
        return changed, mean_deltas, mean_increments, exchange

    def flag_count(self):
        """The floats per outer step that say which rows changed: one per owned row and averaged
        slot (one per row where nothing is averaged)."""
        return sum(part.rows.count * max(1, count) for part, count in zip(self.parts, self.averaged_counts))

    def _owed_rows(self):
        """Per part, whether each owned row has a residual here (something the quantized
        exchange still owes it), or None at 16 bits."""
        if self.bits == 16:
            return [None] * len(self.parts)
        owed = []
        for sent, received, ranges in zip(self.sent_residuals, self.received_residuals, self.ranges):
            served = ranges[self.across.rank]
            received_rows = tf.pad(per_row_largest(received), [[served.first, sent.shape[0] - served.stop]])
            owed.append(tf.maximum(per_row_largest(sent), received_rows) > 0)
        return owed

    def _union(self, scales):
        """Each part's rows (int64 numbers, sorted) that any node changed, and their scales
        (the largest of the nodes' row_scales, a vector per averaged slot): one allreduce (max)
        of flag_count() floats."""
        vectors = [vector for part_scales in scales for vector in part_scales]
        largest = iter(tf.split(self.across.maximum(tf.concat(vectors, 0)),
                                [int(vector.shape[0]) for vector in vectors]))
        changed, gathered = [], []
        for part_scales in scales:
            mine = [next(largest) for _ in part_scales]
            rows = tf.where(tf.reduce_any(tf.stack([vector > 0 for vector in mine]), axis=0))[:, 0]
            changed.append(rows)
            gathered.append([tf.gather(vector, rows) for vector in mine])
        return changed, gathered

    def _averaged(self, deltas, increments, changed, scales, with_deltas=True):
        """(mean deltas, mean increments, bytes sent) of one grouped allreduce of the changed rows
        of `deltas` (unless not `with_deltas`) and of the averaged slots' increments. In fp16, an
        increment travels divided by its row's `scales`: a frequent word's accumulator increments
        over an outer period pass fp16's largest value (65,504) many times over."""
        sending = [index for index, rows in enumerate(changed) if rows.shape[0]]
        with_deltas = sending if with_deltas else []
        divisors = {(index, slot): tables.per_row(scales[index][slot], increments[index][slot]) if self.fp16 else 1.0
                    for index in sending for slot in range(len(increments[index]))}
        sent = ([tf.gather(deltas[index], changed[index]) for index in with_deltas]
                + [tf.gather(increments[index][slot], changed[index]) / divisor
                   for (index, slot), divisor in divisors.items()])
        averaged = self.across.average(sent, fp16=self.fp16) if sent else []
        mean_deltas = [tf.zeros_like(delta) for delta in deltas]
        mean_increments = [[tf.gather(increment, rows) for increment in slot_increments]  # empty ones
                           for slot_increments, rows in zip(increments, changed)]
        for index, delta in zip(with_deltas, averaged[:len(with_deltas)]):
            mean_deltas[index] = tf.scatter_nd(changed[index][:, None], delta, deltas[index].shape)
        for ((index, slot), divisor), increment in zip(divisors.items(), averaged[len(with_deltas):]):
            mean_increments[index][slot] = increment * divisor
        return mean_deltas, mean_increments, sum(t.shape.num_elements() for t in sent) * (2 if self.fp16 else 4)

    def _quantized_mean(self, deltas, changed):
        """(mean deltas, bytes sent) of the changed rows, quantized in two phases with error
        feedback (module docstring)."""
        nodes, me = self.across.size, self.across.rank
        # Phase 1: each node's rows, what it owes them added, quantized; range k of them to node k.
        chunks = [[] for _ in range(nodes)]  # per node, per part: (rows in its range, levels, scales)
        for index, (delta, rows) in enumerate(zip(deltas, changed)):
            residual = self.sent_residuals[index]
            owing = tf.gather(tf.reshape(delta, [delta.shape[0], -1]) + tf.reshape(residual, [residual.shape[0], -1]),
                              rows)
            levels, scales = quantized.quantize(owing, self.bits)
            dropped = owing - quantized.dequantize(levels, scales)
            residual.scatter_nd_update(rows[:, None], tf.reshape(dropped, [-1, *residual.shape[1:]]))
            for node, served in enumerate(self.ranges[index]):
                inside = tf.where((rows >= served.first) & (rows < served.stop))[:, 0]
                chunks[node].append((tf.gather(rows, inside), tf.gather(levels, inside), tf.gather(scales, inside)))
        blobs = [tf.concat([quantized.to_bytes(levels, scales, self.bits) for _, levels, scales in chunk], 0)
                 for chunk in chunks]
        received, _ = self.across.alltoall(tf.concat(blobs, 0), [int(blob.shape[0]) for blob in blobs])
        # Phase 2: the mean of this node's range, what it owes it added, quantized, to every node.
        mine, width = chunks[me], [row_width(delta) for delta in deltas]
        senders = tf.split(received, nodes)
        summed = [0.0] * len(deltas)
        for blob in senders:
            for index, values in enumerate(self._unpack(blob, [rows.shape[0] for rows, _, _ in mine], width)):
                summed[index] = summed[index] + values
        mean_blobs = []
        for index, (rows, _, _) in enumerate(mine):
            served, residual = self.ranges[index][me], self.received_residuals[index]
            local = rows - served.first
            owing = summed[index] / nodes + tf.gather(tf.reshape(residual, [residual.shape[0], -1]), local)
            levels, scales = quantized.quantize(owing, self.bits)
            dropped = owing - quantized.dequantize(levels, scales)
            residual.scatter_nd_update(local[:, None], tf.reshape(dropped, [-1, *residual.shape[1:]]))
            mean_blobs.append(quantized.to_bytes(levels, scales, self.bits))
        gathered = self.across.allgather(tf.concat(mean_blobs, 0))
        # Every node's range of the mean, in node order.
        mean_deltas = [tf.zeros_like(delta) for delta in deltas]
        lengths = [sum(int(rows.shape[0]) * quantized.row_bytes(w, self.bits) for (rows, _, _), w in zip(chunk, width))
                   for chunk in chunks]
        for chunk, blob in zip(chunks, tf.split(gathered, lengths)):
            for index, values in enumerate(self._unpack(blob, [rows.shape[0] for rows, _, _ in chunk], width)):
                rows = chunk[index][0]
                mean_deltas[index] = tf.tensor_scatter_nd_update(
                    mean_deltas[index], rows[:, None], tf.reshape(values, [-1, *deltas[index].shape[1:]]))
        return mean_deltas, sum(lengths)

    def _unpack(self, blob, counts, widths):
        """The float32 rows [count, width] of each part in a blob that to_bytes made, part after part."""
        sizes = [count * quantized.row_bytes(width, self.bits) for count, width in zip(counts, widths)]
        return [quantized.dequantize(*quantized.from_bytes(piece, count, width, self.bits))
                for piece, count, width in zip(tf.split(blob, sizes), counts, widths)]

    def residual_copies(self):
        """(key, logical VocabTable, this rank's logical rows, variable) of each residual of what
        this node sent: its own, for a node's copy in the checkpoint."""
        return [(f"{RESIDUAL_KEY}/sent/{weight_name(part)}", part.logical, part.logical_rows, sent)
                for part, sent in zip(self.parts, self.sent_residuals)]

    def received_residuals_named(self):
        """(key, VocabTable) of the residuals of what this node averaged for the others: one
        logical matrix a weight, each node holding its range of each rank's rows, for the
        checkpoint (any grouping of nodes reads back the rows it averages)."""
        named = {}
        for part, received, ranges in zip(self.parts, self.received_residuals, self.ranges):
            served = ranges[self.across.rank]
            first, stop = part.logical_rows.first, part.logical_rows.stop  # (past stop: padding rows)
            rows = tables.Rows(min(first + served.first, stop), min(first + served.stop, stop))
            key = f"{RESIDUAL_KEY}/received/{weight_name(part)}"
            named.setdefault(key, (part.logical, []))[1].append((rows, received))
        return [(key, tables.VocabTable(logical.name + "_received_residual", logical.vocab_size, logical.width,
                                        blocks)) for key, (logical, blocks) in named.items()]

    def zero_received(self):
        """No residuals yet: a checkpoint without them."""
        for residual in self.received_residuals:
            residual.assign(tf.zeros_like(residual))


def weight_name(part):
    """The weight's name in the checkpoint's keys (what follows the momentum's prefix)."""
    return part.key.split("/", 1)[1]


def owned_shape(part):
    return [part.rows.count, *part.variable.shape[1:]]


def row_width(tensor):
    return int(np.prod(tensor.shape[1:]))


def per_row_largest(tensor):
    return tf.reduce_max(tf.abs(tf.reshape(tensor, [tensor.shape[0], -1])), axis=1)


def row_scales(delta, increments, owed=None):
    """Per row, for each averaged slot's `increments` (or once, with none), 0 where the row did
    not change (its delta and every slot's increment 0, and nothing `owed` to it), else the
    slot's largest increment (the smallest float if that is 0): what its increments are divided
    by in fp16."""
    changed = per_row_largest(delta) > 0
    if owed is not None:
        changed = changed | owed
    changed = tf.cast(changed, tf.float32) * np.finfo(np.float32).tiny
    return [tf.maximum(per_row_largest(increment), changed) for increment in increments] or [changed]
