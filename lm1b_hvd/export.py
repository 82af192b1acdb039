"""`python -m lm1b_hvd.export --logdir L --out DIR [--datadir D] [--embeddings N]`

Writes the trained model as a TensorFlow SavedModel that loads without this package: the
vocabulary is inside, the weights are the EMA averages when the run kept them, and two
signatures take plain strings (words split on whitespace, unknown words read as <UNK>):

  score(sentences: string [n]) -> log_prob [n] (nats, n + 1 predictions a sentence, each
      from a zero state at <S>, as `lm1b_hvd.score`), words [n]
  next_word(prefix: string [n], k: int32) -> words [n, k], log_probs [n, k]: the k most
      probable words after <S> and the prefix

--embeddings N also writes the input embeddings of the N most frequent words, with their
vocabulary counts, to L/projector/ for TensorBoard's Projector (`tensorboard --logdir L`).

Examples:
  python -m lm1b_hvd.export --logdir runs/demo --out exported/demo --embeddings 2000
  saved_model_cli show --dir exported/demo --all
"""
import os
import sys

import tensorflow as tf
from tensorboard.plugins import projector

from lm1b_hvd import console, inference, pinned_stack
from lm1b_hvd.model import tables
from lm1b_hvd.model.language_model import LSTMPLanguageModel

PROJECTOR_DIR = "projector"


class GraphEncoder(tf.Module):
    """Vocabulary.sentence_ids in TensorFlow ops, for a SavedModel that loads without this
    package: the words as a lookup table inside the graph. Words are matched as UTF-8 strings
    (a vocabulary word that is not valid UTF-8 cannot be typed in there anyway)."""

    def __init__(self, vocab):
        super().__init__(name="vocabulary")
        self.words = tf.constant([vocab.id_to_word(i) for i in range(len(vocab))])
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(self.words, tf.range(len(vocab), dtype=tf.int32)),
            default_value=vocab.unk_id)
        self.mark = vocab.sentence_id

    def __call__(self, texts, end_mark=True):
        """`<S> ids [<S>]` of each text [n], zero-padded [n, T], and the real lengths [n]."""
        tokens = self.table.lookup(tf.strings.split(texts))
        marks = tf.RaggedTensor.from_tensor(tf.fill([tf.shape(texts)[0], 1], self.mark))
        sequences = tf.concat([marks, tokens, marks] if end_mark else [marks, tokens], axis=1)
        return sequences.to_tensor(0), tf.cast(sequences.row_lengths(), tf.int32)


class ExportedLanguageModel(tf.Module):
    """The trained model (embedding and softmax each one matrix), the vocabulary as a lookup
    table, and the two serving functions. The LSTM runs as a tf.scan over the model's own
    serving_step, so any sentence length works; the logits are the model's full softmax."""

    def __init__(self, trained):
        super().__init__(name="lm1b_lstm")
        hps = trained.hps.replace(num_shards=1, kernels="portable")  # TensorFlow ops only: loads anywhere
        self.model = LSTMPLanguageModel(hps, len(trained.vocab))
        self.model.copy_weights_from(trained.model)
        # The model keeps its vocabulary tables out of its checkpoints; the SavedModel holds them here.
        self.table_variables = tables.variables_of(self.model.tables)
        self.encoder = GraphEncoder(trained.vocab)

    def _outputs(self, x):
        """The top layer's outputs [T, n, projected] for ids x [n, T], from a zero state."""
        batch = tf.shape(x)[0]

        def step(carried, embedded):
            return self.model.serving_step(embedded, carried[1])

        first_output = tf.zeros([batch, self.model.hps.projected_size])
        outputs, _ = tf.scan(step, self.model.embed(x), initializer=(first_output, self.model.zero_state(batch)))
        return outputs

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="sentences")])
    def score(self, sentences):
        ids, lengths = self.encoder(sentences, end_mark=True)
        outputs = self._outputs(ids[:, :-1])  # [T - 1, n, projected]
        targets = tf.transpose(ids[:, 1:])

        def target_log_prob(pair):
            output, target = pair
            return tf.gather(self.model.full_log_probs(output), target, batch_dims=1)

        per_step = tf.map_fn(target_log_prob, (outputs, targets), fn_output_signature=tf.float32)
        mask = tf.transpose(tf.sequence_mask(lengths - 1, tf.shape(targets)[0], tf.float32))
        return {"log_prob": tf.reduce_sum(per_step * mask, axis=0), "words": lengths - 2}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prefix"),
                                  tf.TensorSpec([], tf.int32, name="k")])
    def next_word(self, prefix, k):
        ids, lengths = self.encoder(prefix, end_mark=False)
        outputs = self._outputs(ids)
        last = tf.gather(tf.transpose(outputs, [1, 0, 2]), lengths - 1, batch_dims=1)
        best = tf.math.top_k(self.model.full_log_probs(last), k=k)
        return {"words": tf.gather(self.encoder.words, best.indices), "log_probs": best.values}


def write_projector(logdir, trained, count):
    """The input embeddings of the `count` most frequent words (ids are frequency ranks) with a
    metadata.tsv of word and count, where TensorBoard's Projector finds them."""
    directory = os.path.join(logdir, PROJECTOR_DIR)
    os.makedirs(directory, exist_ok=True)
    count = min(count, len(trained.vocab))
    vectors = tf.Variable(tf.concat(trained.model.embedding, 0)[:count], name="embedding")
    checkpoint_path = tf.train.Checkpoint(embedding=vectors).write(os.path.join(directory, "embedding.ckpt"))
    rows = ["word\tcount"] + [f"{trained.vocab.id_to_word(i).replace(chr(9), ' ')}\t{trained.vocab.counts[i]}"
                              for i in range(count)]
    console.write_atomically(os.path.join(directory, "metadata.tsv"), "\n".join(rows) + "\n")
    config = projector.ProjectorConfig()
    config.model_checkpoint_path = checkpoint_path
    embedding = config.embeddings.add()
    embedding.tensor_name = pinned_stack.checkpoint_value_key("embedding")
    embedding.metadata_path = "metadata.tsv"
    projector.visualize_embeddings(directory, config)
    writer = tf.summary.create_file_writer(directory)  # an event file makes the folder a run TensorBoard lists
    with writer.as_default():
        tf.summary.text("embeddings", f"{count} most frequent words of {trained.path}", step=trained.step)
    writer.flush()
    return directory, count


def export(args):
    trained = inference.TrainedModel(args.logdir, args.datadir, args.checkpoint)
    module = ExportedLanguageModel(trained)
    if os.path.exists(args.out) and os.listdir(args.out):
        raise console.UserError(f"{args.out}: exists and is not empty; choose a new --out")
    tf.saved_model.save(module, args.out, signatures={"score": module.score, "next_word": module.next_word})
    console.say(f"exported {trained.path} (step {trained.step}, vocabulary {len(trained.vocab):,}) to {args.out}; "
                f"look inside with: saved_model_cli show --dir {args.out} --all")
    if args.embeddings:
        directory, count = write_projector(args.logdir, trained, args.embeddings)
        console.say(f"embeddings of the {count:,} most frequent words in {directory}: tensorboard --logdir {args.logdir}")


def main(argv=None):
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.export")
    inference.add_model_arguments(parser)
    parser.add_argument("--out", required=True, help="directory for the SavedModel (new or empty)")
    parser.add_argument("--embeddings", type=int, default=0, metavar="N",
                        help="also write the N most frequent words' embeddings for TensorBoard's Projector")
    args = parser.parse_args(argv)
    if args.embeddings < 0:
        parser.error("--embeddings must be >= 0")
    return console.run_main(lambda: export(args))


if __name__ == "__main__":
    sys.exit(main())
