"""The LSTMP language model of the lm1b baseline and its two losses.

Embedding and softmax matrices are lists of `num_shards` equal row blocks
(the last padded), which TensorFlow's embedding lookup and sampled softmax
partition with the "div" strategy: word k lives in block k // rows_per_shard.
The full softmax used for evaluation concatenates the blocks in the same
order and trims the padding, so both losses see the same logit for a word.
"""
import math
import typing

import numpy as np
import tensorflow as tf

from lm1b_hvd import compute_plan, ops, tables


def _uniform(shape, fan_in, seed):
    """Unit-scaling uniform initial values (variance 1 / fan_in), seeded so ranks agree.

    Drawn with numpy, in place, in fp32: TensorFlow's CPU allocator keeps the memory of the
    temporaries an initializer op makes, which for the default model's shards is a sizeable
    part of a rank's peak."""
    limit = math.sqrt(3.0 / fan_in)
    values = np.random.default_rng(seed).random(shape, dtype=np.float32)
    values *= 2.0 * limit
    values -= limit
    return values


# Sub-seeds of a step's seed: the sampled candidates, then keep_prob's dropout sites (1 + site);
# embedding dropout and each layer's DropConnect far enough past them for any number of layers.
CANDIDATES_STREAM = 0
WORD_DROPOUT_STREAM = 100_000
RECURRENT_DROPOUT_STREAM = 200_000


def sub_seed(seed, stream):
    """An independent stateless seed for one use (`stream`) of a step's `seed` [2]."""
    return tf.random.experimental.stateless_fold_in(seed, stream)


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


def accidental_hits(true_ids, candidates):
    """Per token, the column of the candidate that is its own target word, or -1: at most one
    per token, since the candidates are unique. One number per token, so the shape stays the
    same from step to step (XLA compiles a step's backward again for every new shape). Found by
    binary search in the sorted candidates, not by comparing all tokens x candidates."""
    order = tf.argsort(candidates)
    sorted_candidates = tf.gather(candidates, order)
    at = tf.minimum(tf.searchsorted(sorted_candidates, true_ids), tf.size(candidates, tf.int32) - 1)
    return tf.where(tf.equal(tf.gather(sorted_candidates, at), true_ids), tf.gather(order, at), -1)


class SoftmaxRows(typing.NamedTuple):
    """Rows of the sharded softmax that one batch's sampled softmax uses."""
    hit_columns: tf.Tensor  # [tokens] int32: the candidate that is the token's target word, or -1
    true_w: tf.Tensor  # [tokens, projected_size]
    true_b: tf.Tensor  # [tokens], minus log expected count
    candidate_w: tf.Tensor  # [num_sampled, projected_size]
    candidate_b: tf.Tensor  # [num_sampled], minus log expected count


def gate_multiply_adds(hps, inputs):
    """Multiply-adds of one layer's gates per word: (inputs + projected) x 4 state for the
    original; through the inner size R for F-LSTM ((inputs + projected) x R + R x 4 state); 1/G
    of the original's for G-LSTM. Also the gate matrices' parameter count."""
    rows = inputs + hps.projected_size
    if hps.lstm_factor:
        return rows * hps.lstm_factor + hps.lstm_factor * 4 * hps.state_size
    return rows * 4 * hps.state_size // hps.lstm_groups


class ParameterCount(typing.NamedTuple):
    """The model's parameters by part, counted from the shapes (no padding rows)."""
    lstm: int
    embedding: int
    softmax: int  # its weights (none of its own when tied) and biases

    @property
    def total(self):
        return self.lstm + self.embedding + self.softmax


def parameter_count(hps, vocab_size):
    lstm = 0
    for layer in range(hps.num_layers):
        inputs = hps.emb_size if layer == 0 else hps.projected_size
        lstm += gate_multiply_adds(hps, inputs) + 4 * hps.state_size + hps.state_size * hps.projected_size
    softmax = vocab_size * (1 if hps.tie_embeddings else 1 + hps.projected_size)
    return ParameterCount(lstm, vocab_size * hps.emb_size, softmax)


def table_bytes_per_row(hps):
    """Bytes a rank holds per vocabulary row it holds: the tables' fp32 values and their Adagrad
    accumulators (whatever the precision, the tables stay fp32)."""
    widths = hps.emb_size + (0 if hps.tie_embeddings else hps.projected_size) + 1
    return 2 * 4 * widths


def training_flops_per_word(hps, vocab_size):
    """Model FLOPs of one trained word, counted from the shapes: per LSTMP layer the gates
    (gate_multiply_adds) and the projection (state x projected), then the softmax (sampled
    candidates plus the true word, or the whole vocabulary); x2 for multiply-adds, x3 for the
    backward's two matmuls per forward one."""
    multiply_adds = 0
    for layer in range(hps.num_layers):
        inputs = hps.emb_size if layer == 0 else hps.projected_size
        multiply_adds += gate_multiply_adds(hps, inputs) + hps.state_size * hps.projected_size
    sampled = 0 < hps.num_sampled < vocab_size
    multiply_adds += (hps.num_sampled + 1 if sampled else vocab_size) * hps.projected_size
    return 2 * 3 * multiply_adds


class VocabularyTables:
    """The model's tables of the vocabulary (tables.VocabTable): the embedding, the softmax's
    weights and its biases; with tied embeddings the softmax's weights are the embedding, and
    there are two tables, which is what a checkpoint of a tied model holds."""
    NAMES = ("embedding", "softmax_w", "softmax_b")

    def __init__(self, embedding, softmax_w, softmax_b):
        self.embedding, self.softmax_w, self.softmax_b = embedding, softmax_w, softmax_b

    @property
    def tied(self):
        return self.softmax_w is self.embedding

    def named(self):
        """(name, table) of each distinct table."""
        return [(name, table) for name, table in zip(self.NAMES, (self.embedding, self.softmax_w, self.softmax_b))
                if not (name == "softmax_w" and self.tied)]

    def __iter__(self):
        return iter([table for _, table in self.named()])


def batch_major(output_chunks):
    """The LSTM's time-major output chunks as one [batch, steps, projected_size] tensor."""
    return tf.transpose(tf.concat(output_chunks, axis=0), [1, 0, 2])


class LSTMPLanguageModel(tf.Module):
    """Embedding -> `num_layers` LSTM-with-projection layers -> softmax over the vocabulary.

    The one forward pass (`forward`, or `run_layers` on embeddings) and the one full softmax
    (`full_softmax_logits`) that training, evaluation, scoring, sampling and export all use;
    `serving_step` is the same LSTM one time step at a time, for a graph that runs any number
    of steps. `plan` (compute_plan.ComputePlan) says how it computes on this device: chosen
    once from the hparams and the device when not given."""

    def __init__(self, hps, vocab_size, plan=None, candidate_sampler=None, vocab_exchange=None, name="lm"):
        super().__init__(name=name)
        self.hps = hps
        self.vocab_size = vocab_size
        self.plan = plan or compute_plan.choose(hps)
        # vocab_parallel: a distributed.VocabExchange; the tables hold this rank's rows only.
        self.exchange = vocab_exchange
        self.rows_per_shard = -(-vocab_size // hps.num_shards)
        # Tests may fix the sampled candidates; by default a stateless log-uniform sampler draws them.
        self.candidate_sampler = candidate_sampler
        seed = iter(range(hps.seed * 1000, hps.seed * 1000 + 1000))
        embedding_seeds = [next(seed) for _ in range(hps.num_shards)]
        # The gate matrices (ops.LayerWeights: their shapes say which LSTM), and F-LSTM's second factors.
        self.lstm_weights, self.lstm_factors, self.lstm_biases, self.lstm_projections = [], [], [], []
        for layer in range(hps.num_layers):
            inputs = hps.emb_size if layer == 0 else hps.projected_size
            self.lstm_weights.append(self._initial_gate_matrix(inputs, next(seed), name=f"lstm_{layer}_w"))
            if hps.lstm_factor:
                self.lstm_factors.append(tf.Variable(_uniform([hps.lstm_factor, 4 * hps.state_size], hps.lstm_factor,
                                                              next(seed)), name=f"lstm_{layer}_factor"))
            self.lstm_biases.append(tf.Variable(tf.zeros([4 * hps.state_size]), name=f"lstm_{layer}_b"))
            self.lstm_projections.append(tf.Variable(
                _uniform([hps.state_size, hps.projected_size], hps.state_size, next(seed)),
                name=f"lstm_{layer}_proj"))
        softmax_seeds = [next(seed) for _ in range(hps.num_shards)]
        # A plain object, so that tf.Module does not track the tables' variables: checkpoints
        # hold them as logical matrices (tables.py), not as this model's block variables.
        bias_rows = self.exchange.rows if self.exchange else tables.Rows(0, vocab_size)
        embedding = self._initial_table("emb", hps.emb_size, hps.emb_size, embedding_seeds)
        self.tables = VocabularyTables(
            embedding=embedding,
            softmax_w=(embedding if hps.tie_embeddings else
                       self._initial_table("softmax_w", hps.projected_size, hps.projected_size, softmax_seeds)),
            softmax_b=tables.VocabTable("softmax_b", vocab_size, None, [
                (bias_rows, tf.Variable(tf.zeros([bias_rows.count]), name="softmax_b"))]))

    def _initial_gate_matrix(self, inputs, seed, name):
        """A layer's gate matrix: [inputs + projected, 4 state] (the original), [inputs +
        projected, lstm_factor] (F-LSTM's first factor) or [groups, (inputs + projected) / groups,
        4 state / groups] (G-LSTM), unit-scaling uniform over its own fan-in."""
        hps = self.hps
        rows = inputs + hps.projected_size
        if hps.lstm_factor:
            return tf.Variable(_uniform([rows, hps.lstm_factor], rows, seed), name=name)
        if hps.lstm_groups > 1:
            groups = hps.lstm_groups
            return tf.Variable(_uniform([groups, rows // groups, 4 * hps.state_size // groups], rows // groups, seed),
                               name=name)
        return tf.Variable(_uniform([rows, 4 * hps.state_size], rows, seed), name=name)

    @property
    def vocab_parallel(self):
        return self.exchange is not None

    def _initial_table(self, name, width, fan_in, seeds):
        """A table of unit-scaling uniform initial values, one seed per row block of the
        original's layout (`num_shards` blocks, the last padded), held in that layout, or as
        this rank's rows alone when the vocabulary is sharded over the ranks: the same values
        either way."""
        if self.exchange:
            rows = self.exchange.rows
            values = tables.initial_rows(rows, width, fan_in, self.rows_per_shard, seeds, _uniform)
            return tables.VocabTable(name, self.vocab_size, width, [(rows, tf.Variable(values, name=name))])
        blocks = []
        for index, rows in enumerate(tables.replicated_blocks(self.vocab_size, self.hps.num_shards)):
            padded = tables.Rows(index * self.rows_per_shard, (index + 1) * self.rows_per_shard)
            values = tables.initial_rows(padded, width, fan_in, self.rows_per_shard, seeds, _uniform)
            blocks.append((rows, tf.Variable(values, name=f"{name}_{index}")))
        return tables.VocabTable(name, self.vocab_size, width, blocks)

    @property
    def embedding(self):
        """The embedding's block variables held here."""
        return self.tables.embedding.variables

    @property
    def softmax_w(self):
        return self.tables.softmax_w.variables

    @property
    def softmax_b(self):
        (variable,) = self.tables.softmax_b.variables
        return variable

    @property
    def lstm_variables(self):
        return self.lstm_weights + self.lstm_factors + self.lstm_biases + self.lstm_projections

    @property
    def tied(self):
        return self.tables.tied

    @property
    def softmax_variables(self):
        """The softmax's own variables: with tied embeddings its biases alone."""
        return ([] if self.tied else self.softmax_w) + [self.softmax_b]

    @property
    def all_variables(self):
        """Embedding, LSTM, softmax: the order the training step groups gradients in."""
        return self.embedding + self.lstm_variables + self.softmax_variables

    def layer_weights(self, layer):
        return ops.LayerWeights(self.lstm_weights[layer], self.lstm_biases[layer], self.lstm_projections[layer],
                                self.lstm_factors[layer] if self.lstm_factors else None)

    def copy_weights_from(self, other):
        """Gives this model `other`'s weights, whatever the two models' numbers of shards: the
        embedding and softmax as their whole (logical) matrices, in "div" order."""
        for mine, theirs in ((self.embedding, other.embedding), (self.softmax_w, other.softmax_w)):
            whole = tf.concat(theirs, axis=0)[:self.vocab_size]
            for shard, variable in enumerate(mine):
                rows = whole[shard * self.rows_per_shard:(shard + 1) * self.rows_per_shard]
                padding = self.rows_per_shard - rows.shape[0]
                variable.assign(tf.pad(rows, [[0, padding], [0, 0]]) if padding else rows)
        for mine, theirs in zip(self.lstm_variables + [self.softmax_b], other.lstm_variables + [other.softmax_b]):
            mine.assign(theirs)

    def zero_state(self, batch_size):
        """Per layer an ops.LSTMState: the per-row state carried from batch to batch."""
        hps = self.hps
        return [ops.LSTMState(tf.zeros([batch_size, hps.state_size]), tf.zeros([batch_size, hps.projected_size]))
                for _ in range(hps.num_layers)]

    def state_to_array(self, state):
        """The per-row state as one array [layers, batch, state_size + projected_size]."""
        return np.stack([np.concatenate([c.numpy(), h.numpy()], axis=1) for c, h in state])

    def state_from_array(self, array):
        size = self.hps.state_size
        return [ops.LSTMState(tf.constant(layer[:, :size]), tf.constant(layer[:, size:]))
                for layer in np.asarray(array, np.float32)]

    def _dropout(self, chunks, training, seed, site):
        """Dropout at `site` (0: the embeddings, k + 1: layer k's outputs) of values given in time
        chunks, its mask drawn from the step's stateless `seed` for all of them at once: the same
        mask, and the same result, as dropout of the values whole. With variational_dropout one
        mask per row [batch, width], which every step of the window shares (Gal and Ghahramani)."""
        if not training or self.hps.keep_prob >= 1.0:
            return chunks
        steps = 1 if self.hps.variational_dropout else sum(chunk.shape[0] for chunk in chunks)
        shape = tf.concat([[steps], tf.shape(chunks[0])[1:]], axis=0)
        masks = tf.nn.experimental.stateless_dropout(tf.ones(shape), rate=1.0 - self.hps.keep_prob,
                                                     seed=sub_seed(seed, CANDIDATES_STREAM + 1 + site))
        if self.hps.variational_dropout:
            return [chunk * masks for chunk in chunks]
        return [chunk * mask for chunk, mask in zip(chunks, tf.split(masks, [c.shape[0] for c in chunks]))]

    def word_keep_scale(self, seed):
        """Embedding dropout's factor of each word of the vocabulary this step [vocab_size]:
        0 for a dropped word, 1 / emb_keep_prob for a kept one, so every occurrence of a dropped
        word in the batch loses its whole embedding (Merity et al.'s embedding dropout)."""
        return tf.nn.experimental.stateless_dropout(tf.ones([self.vocab_size]), rate=1.0 - self.hps.emb_keep_prob,
                                                    seed=sub_seed(seed, WORD_DROPOUT_STREAM))

    def embed(self, x, traffic=None, seed=None):
        """The input embeddings of `x` [batch, steps], time-major: [steps, batch, emb_size].
        Vocabulary-parallel, each word's row comes from its owner (what moves is counted into
        `traffic`, a distributed.Traffic, when given). Given a training step's `seed`, with
        embedding dropout (emb_keep_prob < 1)."""
        ids = tf.transpose(x)
        if not self.exchange:
            embedded = tf.nn.embedding_lookup(self.embedding, ids)
        else:
            unique, positions = tf.unique(tf.reshape(tf.cast(ids, tf.int64), [-1]))
            rows = self.exchange.fetch(self.embedding, unique, traffic)
            embedded = tf.reshape(tf.gather(rows, positions), tf.concat([tf.shape(ids), [self.hps.emb_size]], axis=0))
            embedded = tf.ensure_shape(embedded, ids.shape.concatenate([self.hps.emb_size]))
        if seed is not None and self.hps.emb_keep_prob < 1.0:
            embedded *= tf.gather(self.word_keep_scale(seed), ids)[..., None]
        return embedded

    def training_layer_weights(self, layer, seed):
        """The layer's weights for a training step: with DropConnect (recurrent_keep_prob < 1)
        the recurrent rows of its gate matrix masked, one mask for the step's whole window, kept
        weights scaled by 1 / recurrent_keep_prob (Merity et al.'s weight drop). The mask is applied
        outside the layer, whose hand-written backward then gives the masked matrix's gradient."""
        weights = self.layer_weights(layer)
        if self.hps.recurrent_keep_prob >= 1.0:
            return weights
        inputs = self.hps.emb_size if layer == 0 else self.hps.projected_size
        given, recurrent = ops.split_gate_rows(weights.weight, inputs)
        recurrent = tf.nn.experimental.stateless_dropout(recurrent, rate=1.0 - self.hps.recurrent_keep_prob,
                                                         seed=sub_seed(seed, RECURRENT_DROPOUT_STREAM + layer))
        return weights._replace(weight=tf.concat([given, recurrent], axis=ops.gate_rows_axis(weights.weight)))

    def run_layers(self, embedded, state, training, seed=None):
        """The LSTM over time-major embeddings [steps, batch, emb_size]: its outputs, time-major,
        in the plan's time chunks (each chunk is there once its steps are, for the sampled
        softmax to start on it beside the next chunk's steps), and the state after the last
        step. Training with dropout needs the step's `seed`."""
        chunks = self._dropout(ops.time_chunks(embedded, self.plan.time_chunks), training, seed, 0)
        new_state = []
        for layer, layer_state in enumerate(state):
            weights = self.training_layer_weights(layer, seed) if training else self.layer_weights(layer)
            chunks, layer_state = ops.lstmp_layer(chunks, layer_state, weights, **self.plan.layer_options())
            chunks = self._dropout(chunks, training, seed, layer + 1)
            new_state.append(layer_state)
        return chunks, new_state

    def forward(self, x, state, training, seed=None):
        """LSTM outputs [batch, steps, projected_size] of word ids `x` [batch, steps], and the
        state after the last step."""
        output_chunks, new_state = self.run_layers(self.embed(x, seed=seed if training else None), state, training,
                                                   seed)
        return batch_major(output_chunks), new_state

    def serving_step(self, embedded, state):
        """The LSTM one time step at a time, forward only: (output [batch, projected_size], new
        state) from the step's embeddings [batch, emb_size], for a graph that runs any number of
        steps (the SavedModel's tf.scan)."""
        new_state, inputs = [], embedded
        for layer, layer_state in enumerate(state):
            layer_state = ops.lstmp_step(inputs, layer_state, self.layer_weights(layer))
            new_state.append(layer_state)
            inputs = layer_state.h
        return inputs, new_state

    def softmax_matrix(self):
        """The shards concatenated in "div" order, padding trimmed: [vocab_size, projected_size]."""
        if self.exchange:
            raise ValueError("a vocabulary-parallel model holds no whole softmax; read its checkpoint replicated")
        if len(self.softmax_w) == 1 and self.rows_per_shard == self.vocab_size:
            return self.softmax_w[0]  # already whole: no copy
        return tf.concat(self.softmax_w, axis=0)[:self.vocab_size]

    def full_softmax_logits(self, outputs):
        """The logits of every word [..., vocab_size] for LSTM outputs [..., projected_size]."""
        return tf.linalg.matmul(outputs, self.softmax_matrix(), transpose_b=True) + self.softmax_b

    def full_log_probs(self, outputs):
        """log P(word | history) of every word of the vocabulary, [..., vocab_size]."""
        return tf.nn.log_softmax(self.full_softmax_logits(outputs))

    def full_softmax_losses(self, outputs, y):
        """Per-token cross-entropy [batch, steps] over the whole vocabulary, one step at a time
        so the logits never exceed [batch, vocab_size]. Vocabulary-parallel, over every rank's
        share of the softmax (each rank calls it with a batch of the same size)."""
        if self.exchange:
            return tf.stack([self.exchange.full_softmax_losses(outputs[:, step], y[:, step], self.softmax_w[0],
                                                               self.softmax_b) for step in range(y.shape[1])], axis=1)
        return tf.stack([tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=y[:, step], logits=self.full_softmax_logits(outputs[:, step])) for step in range(y.shape[1])], axis=1)

    def uses_sampled_softmax(self):
        return 0 < self.hps.num_sampled < self.vocab_size

    def sample_candidates(self, labels, seed):
        """(candidates [num_sampled], expected count of each label, of each candidate): unique
        log-uniform draws (ids sorted by frequency make this the right proposal)."""
        if self.candidate_sampler:
            return self.candidate_sampler(labels)
        candidates, expected_count = unique_log_uniform_candidates(
            sub_seed(seed, CANDIDATES_STREAM), self.hps.num_sampled, self.vocab_size)
        return candidates, expected_count(labels), expected_count(candidates)

    def softmax_rows(self, y, seed=None, traffic=None):
        """The sampled softmax's gathered rows for targets `y` [batch, steps], time-major as the
        LSTM's outputs: what the loss needs from the sharded matrices, gathered outside any
        compiled part (gathers over shards give the sparse gradients), and the accidental hits.
        Biases carry the log-expected-count correction. Vocabulary-parallel, the rows of the
        targets and candidates, each once, come from their owners in one exchange."""
        labels = tf.reshape(tf.cast(tf.transpose(y), tf.int64), [-1, 1])
        candidates, true_expected, candidate_expected = (
            tf.stop_gradient(v) for v in self.sample_candidates(labels, seed))
        candidates = tf.cast(candidates, tf.int64)
        true_ids = tf.reshape(labels, [-1])
        if self.exchange:
            unique, positions = tf.unique(tf.concat([true_ids, candidates], axis=0))
            rows = self.exchange.fetch([self.softmax_w[0], self.softmax_b], unique, traffic)
            true_rows, candidate_rows = tf.split(tf.gather(rows, positions), [tf.size(true_ids), -1])
            true_w, true_b = true_rows[:, :-1], true_rows[:, -1]
            candidate_w, candidate_b = candidate_rows[:, :-1], candidate_rows[:, -1]
        else:
            true_w, true_b = tf.nn.embedding_lookup(self.softmax_w, true_ids), tf.gather(self.softmax_b, true_ids)
            candidate_w = tf.nn.embedding_lookup(self.softmax_w, candidates)
            candidate_b = tf.gather(self.softmax_b, candidates)
        return SoftmaxRows(
            hit_columns=accidental_hits(true_ids, candidates),
            true_w=true_w, true_b=true_b - tf.math.log(tf.reshape(true_expected, [-1])),
            candidate_w=candidate_w, candidate_b=candidate_b - tf.math.log(candidate_expected))

    def sampled_losses(self, output_chunks, rows):
        """Per-token sampled-softmax loss [batch, steps] from the LSTM's time-major output chunks
        and the gathered `rows`: tf.nn.sampled_softmax_loss's math (candidates shared by all
        tokens, accidental hits removed), computed with ops.sampled_cross_entropy one chunk at a
        time, so that a chunk's logits are computed beside the next chunk's steps."""
        batch = tf.shape(output_chunks[0])[1]
        tokens = [chunk.shape[0] * batch for chunk in output_chunks]
        losses = []
        for chunk, hit_columns, true_w, true_b in zip(output_chunks, tf.split(rows.hit_columns, tokens),
                                                      tf.split(rows.true_w, tokens), tf.split(rows.true_b, tokens)):
            inputs = tf.reshape(chunk, [-1, self.hps.projected_size])
            true_logits = tf.reduce_sum(inputs * true_w, axis=1) + true_b
            chunk_losses = ops.sampled_cross_entropy(inputs, rows.candidate_w, rows.candidate_b, true_logits,
                                                     hit_columns, **self.plan.softmax_options())
            losses.append(tf.reshape(chunk_losses, [chunk.shape[0], batch]))
        return tf.transpose(tf.concat(losses, axis=0))
