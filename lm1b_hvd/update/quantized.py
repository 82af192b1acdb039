"""Rows of numbers in 8 or 4 bits, for the outer step's exchange between nodes (hparam
outer_bits, update.outer).

Each row is scaled by its largest magnitude over the format's largest level (127 for 8 bits, 7
for 4: symmetric, so that 0 stays 0 and a row's sign is kept), rounded half to even, and sent as
int8 or as two 4-bit values a byte, with the row's scale as a float32 beside it. What the
rounding drops is the caller's to keep (error feedback: update.outer adds it to what the next
outer step sends). The functions are TensorFlow ops on both sides of the wire, so that any
transport of bytes (Horovod's alltoall and allgather, or an MPI communicator) carries them.
"""
import tensorflow as tf

LEVELS = {8: 127, 4: 7}  # the largest level of each format; its negative is the smallest
SCALE_BYTES = 4  # a row's scale, float32


def quantize(rows, bits):
    """(levels int8 [n, width], scales float32 [n]) of `rows` [n, ...], one scale a row; a row of
    zeros has scale 0."""
    flat = tf.reshape(rows, [tf.shape(rows)[0], -1])
    scales = tf.reduce_max(tf.abs(flat), axis=1) / LEVELS[bits]
    divisor = tf.where(scales > 0, scales, tf.ones_like(scales))
    levels = tf.clip_by_value(tf.round(flat / divisor[:, None]), -LEVELS[bits], LEVELS[bits])
    return tf.cast(levels, tf.int8), scales


def dequantize(levels, scales):
    """The float32 rows [n, width] that `levels` and `scales` stand for."""
    return tf.cast(levels, tf.float32) * scales[:, None]


def row_bytes(width, bits):
    """The bytes a row of `width` numbers takes on the wire, its scale included."""
    return (width if bits == 8 else (width + 1) // 2) + SCALE_BYTES


def to_bytes(levels, scales, bits):
    """One uint8 vector: the levels row by row (4 bits: two a byte, the row padded to an even
    width), then the scales."""
    if bits == 4:
        nibbles = tf.cast(levels + 8, tf.uint8)  # 1..15
        if levels.shape[1] % 2:
            nibbles = tf.pad(nibbles, [[0, 0], [0, 1]], constant_values=8)
        packed = tf.bitwise.bitwise_or(nibbles[:, 0::2], tf.bitwise.left_shift(nibbles[:, 1::2], 4))
    else:
        packed = tf.bitcast(levels, tf.uint8)
    return tf.concat([tf.reshape(packed, [-1]), tf.reshape(tf.bitcast(scales, tf.uint8), [-1])], 0)


def from_bytes(blob, rows, width, bits):
    """(levels [rows, width], scales [rows]) from what to_bytes made of them."""
    packed_width = width if bits == 8 else (width + 1) // 2
    packed = tf.reshape(blob[:rows * packed_width], [rows, packed_width])
    scales = tf.bitcast(tf.reshape(blob[rows * packed_width:], [rows, SCALE_BYTES]), tf.float32)
    if bits == 8:
        return tf.bitcast(packed, tf.int8), scales
    low = tf.bitwise.bitwise_and(packed, 15)
    high = tf.bitwise.right_shift(packed, 4)
    nibbles = tf.reshape(tf.stack([low, high], axis=2), [rows, 2 * packed_width])[:, :width]
    return tf.cast(nibbles, tf.int8) - 8, scales
