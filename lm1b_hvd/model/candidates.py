"""The sampled softmax's candidates: unique log-uniform draws (ids sorted by frequency make this
the right proposal), drawn from a step's stateless seed, and the accidental hits among them."""
import math

import tensorflow as tf

from lm1b_hvd.model.step_seeds import CANDIDATES_STREAM, sub_seed


def log_uniform_probability(ids, range_max):
    """P(id) under the log-uniform (Zipfian) proposal over ids [0, range_max)."""
    ids = tf.cast(ids, tf.float64)
    return (tf.math.log(ids + 2.0) - tf.math.log(ids + 1.0)) / math.log(range_max + 1.0)


def unique_log_uniform_candidates(seed, num_sampled, range_max):
    """What tf.random.log_uniform_candidate_sampler(unique=True) draws, from a stateless `seed`:
    log-uniform ids in draw order, duplicates dropped, until `num_sampled` distinct ones; the
    expected count of an id is 1 - (1 - p)^tries over the tries it took, as TF counts it.

    Stateless so that a step's candidates depend only on (seed, rank, step): a resumed run
    draws what the uninterrupted one drew. Returns (candidates, expected_count function)."""
    chunk = max(2 * num_sampled, 1024)
    log_range = math.log(range_max + 1.0)

    def draw(round_):
        uniform = tf.random.stateless_uniform([chunk], sub_seed(seed, round_), dtype=tf.float64)
        ids = tf.cast(tf.floor(tf.exp(uniform * log_range)), tf.int64) - 1
        return tf.clip_by_value(ids, 0, range_max - 1)

    def too_few(ids, _round):
        return tf.size(tf.unique(ids).y) < num_sampled

    def draw_more(ids, round_):
        return tf.concat([ids, draw(round_)], 0), round_ + 1

    ids, _ = tf.while_loop(too_few, draw_more, [draw(0), tf.constant(1)],
                           shape_invariants=[tf.TensorShape([None]), tf.TensorShape([])])
    unique, positions = tf.unique(ids)
    first_draw = tf.math.unsorted_segment_min(tf.range(tf.shape(positions)[0]), positions, tf.shape(unique)[0])
    tries = tf.cast(first_draw[num_sampled - 1] + 1, tf.float64)

    def expected_count(targets):
        p = log_uniform_probability(targets, range_max)
        return tf.cast(-tf.math.expm1(tries * tf.math.log1p(-p)), tf.float32)

    return tf.ensure_shape(unique[:num_sampled], [num_sampled]), expected_count


def draw(labels, seed, num_sampled, vocab_size):
    """(candidates [num_sampled], expected count of each label, of each candidate) for a step's
    `seed`: what a candidate sampler returns (tests may give the model a fixed one instead)."""
    candidates, expected_count = unique_log_uniform_candidates(sub_seed(seed, CANDIDATES_STREAM), num_sampled,
                                                               vocab_size)
    return candidates, expected_count(labels), expected_count(candidates)


def accidental_hits(true_ids, candidates):
    """Per token, the column of the candidate that is its own target word, or -1: at most one
    per token, since the candidates are unique. One number per token, so the shape stays the
    same from step to step (XLA compiles a step's backward again for every new shape). Found by
    binary search in the sorted candidates, not by comparing all tokens x candidates."""
    order = tf.argsort(candidates)
    sorted_candidates = tf.gather(candidates, order)
    at = tf.minimum(tf.searchsorted(sorted_candidates, true_ids), tf.size(candidates, tf.int32) - 1)
    return tf.where(tf.equal(tf.gather(sorted_candidates, at), true_ids), tf.gather(order, at), -1)
