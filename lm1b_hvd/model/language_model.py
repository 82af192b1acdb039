"""The LSTMP language model of the lm1b baseline: its variables, its forward pass, its two losses.

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

from lm1b_hvd.model import candidates, compute_plan, ops, regularisation, tables


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


class SoftmaxRows(typing.NamedTuple):
    """Rows of the sharded softmax that one batch's sampled softmax uses."""
    hit_columns: tf.Tensor  # [tokens] int32: the candidate that is the token's target word, or -1
    true_w: tf.Tensor  # [tokens, projected_size]
    true_b: tf.Tensor  # [tokens], minus log expected count
    candidate_w: tf.Tensor  # [num_sampled, projected_size]
    candidate_b: tf.Tensor  # [num_sampled], minus log expected count


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
        # vocab_parallel: an exchange.vocab_parallel.VocabExchange; the tables hold this rank's rows only.
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
        self.tables = tables.VocabularyTables(
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

    def embed(self, x, traffic=None, seed=None):
        """The input embeddings of `x` [batch, steps], time-major: [steps, batch, emb_size].
        Vocabulary-parallel, each word's row comes from its owner (what moves is counted into
        `traffic`, an exchange.gradients.Traffic, when given). Given a training step's `seed`, with
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
            embedded *= tf.gather(regularisation.word_keep_scale(self.hps, self.vocab_size, seed), ids)[..., None]
        return embedded

    def run_layers(self, embedded, state, training, seed=None):
        """The LSTM over time-major embeddings [steps, batch, emb_size]: its outputs, time-major,
        in the plan's time chunks (each chunk is there once its steps are, for the sampled
        softmax to start on it beside the next chunk's steps), and the state after the last
        step. Training with dropout needs the step's `seed`."""
        hps = self.hps
        chunks = ops.time_chunks(embedded, self.plan.time_chunks)
        chunks = regularisation.dropout(chunks, hps, seed, 0) if training else chunks
        new_state = []
        for layer, layer_state in enumerate(state):
            weights = self.layer_weights(layer)
            if training:
                weights = regularisation.drop_connect(weights, hps, layer, seed)
            chunks, layer_state = ops.lstmp_layer(chunks, layer_state, weights, **self.plan.layer_options())
            if training:
                chunks = regularisation.dropout(chunks, hps, seed, layer + 1)
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

    def softmax_rows(self, y, seed=None, traffic=None):
        """The sampled softmax's gathered rows for targets `y` [batch, steps], time-major as the
        LSTM's outputs: what the loss needs from the sharded matrices, gathered outside any
        compiled part (gathers over shards give the sparse gradients), and the accidental hits.
        Biases carry the log-expected-count correction. Vocabulary-parallel, the rows of the
        targets and candidates, each once, come from their owners in one exchange."""
        labels = tf.reshape(tf.cast(tf.transpose(y), tf.int64), [-1, 1])
        sampler = self.candidate_sampler or (lambda labels: candidates.draw(labels, seed, self.hps.num_sampled,
                                                                            self.vocab_size))
        drawn, true_expected, candidate_expected = (tf.stop_gradient(v) for v in sampler(labels))
        drawn = tf.cast(drawn, tf.int64)
        true_ids = tf.reshape(labels, [-1])
        if self.exchange:
            unique, positions = tf.unique(tf.concat([true_ids, drawn], axis=0))
            rows = self.exchange.fetch([self.softmax_w[0], self.softmax_b], unique, traffic)
            true_rows, candidate_rows = tf.split(tf.gather(rows, positions), [tf.size(true_ids), -1])
            true_w, true_b = true_rows[:, :-1], true_rows[:, -1]
            candidate_w, candidate_b = candidate_rows[:, :-1], candidate_rows[:, -1]
        else:
            true_w, true_b = tf.nn.embedding_lookup(self.softmax_w, true_ids), tf.gather(self.softmax_b, true_ids)
            candidate_w = tf.nn.embedding_lookup(self.softmax_w, drawn)
            candidate_b = tf.gather(self.softmax_b, drawn)
        return SoftmaxRows(
            hit_columns=candidates.accidental_hits(true_ids, drawn),
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
