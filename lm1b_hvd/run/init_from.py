"""`train --init_from PATH`: a new run starts from a trained model's weights (fine-tuning on a
new corpus, the field's usual path from a general model to a domain).

What is taken: the source run's weights as evaluation reads them (its averages when it kept
them), the LSTM whole and, of the vocabulary's tables, the rows of the words both vocabularies
hold, matched by word; the other words start as in a fresh run. What starts fresh: Adagrad's
accumulators (the new corpus's gradients set the steps), the averages (at the new weights),
the step, the learning rate and the data order. The model's shape must be the source's.
Every rank reads the source itself and keeps the rows it holds, so it works replicated and
vocabulary-parallel, at any rank count, from a run made at any rank count.
"""
import os

import numpy as np
import tensorflow as tf

from lm1b_hvd import console, hparams
from lm1b_hvd.data import dataset
from lm1b_hvd.model import tables
from lm1b_hvd.run import checkpoints
from lm1b_hvd.run.weights import run_weights

VOCAB_COPY = dataset.VOCAB_FILE  # a run keeps its vocabulary beside hparams.json, for --init_from


class InitFromError(console.UserError):
    """An --init_from that is not a run this model can start from."""


def source_checkpoint(path):
    """(the run's log directory, the checkpoint) that --init_from PATH names: a log directory
    (its newest checkpoint), its best/ (the best one), or one checkpoint (PREFIX-STEP)."""
    if os.path.isdir(path):
        logdir = os.path.dirname(path.rstrip("/")) if os.path.basename(path.rstrip("/")) == checkpoints.BEST_DIR else path
        checkpoint = tf.train.latest_checkpoint(path)
    else:
        folder = os.path.dirname(path) or "."
        logdir = os.path.dirname(folder) if os.path.basename(folder) == checkpoints.BEST_DIR else folder
        checkpoint = path if tf.io.gfile.exists(path + ".index") else None
    if not os.path.exists(os.path.join(logdir, checkpoints.HPARAMS_FILE)):
        raise InitFromError(f"--init_from {path}: not a training run (no {checkpoints.HPARAMS_FILE} in {logdir})")
    if checkpoint is None:
        raise InitFromError(f"--init_from {path}: no checkpoint there")
    if not os.path.exists(os.path.join(logdir, VOCAB_COPY)):
        raise InitFromError(f"--init_from {path}: {logdir} has no copy of its vocabulary ({VOCAB_COPY}; runs keep "
                            "one since this option exists): copy its corpus's vocabulary file there")
    return logdir, checkpoint


def check_shape(path, source_hps, hps):
    """The first model-shape hparam that differs is a one-line error."""
    for key in hparams.MODEL_SHAPE_KEYS:
        if getattr(source_hps, key) != getattr(hps, key):
            raise InitFromError(f"--init_from {path}: hparam '{key}' is {getattr(source_hps, key)} there but "
                                f"{getattr(hps, key)} here; the model's shape must be the same")


def check(path, hps):
    """Before anything is written: PATH is a run with a checkpoint and a vocabulary, of this
    shape. Returns (its log directory, the checkpoint) for start_from."""
    logdir, checkpoint = source_checkpoint(path)
    check_shape(path, checkpoints.load_run_hparams(logdir), hps)
    return logdir, checkpoint


def start_from(source_run, state, vocab):
    """Sets `state`'s model to the weights of `source_run` (what check returned; module
    docstring); returns the line that says what was taken."""
    logdir, checkpoint = source_run
    source = run_weights(logdir, logdir)
    source.state.restore(checkpoint)
    if source.hps.average_params:
        source.state.ema.copy_averages_to_targets()
    model, taken = state.model, source.state.model
    for variable, value in zip(model.lstm_variables, taken.lstm_variables):
        variable.assign(value)
    source_rows = np.array([source.vocab.ids.get(word, -1) for word in vocab.words])
    for (name, table), (_, source_table) in zip(model.tables.named(), taken.tables.named()):
        whole = tf.concat([variable for _, variable in source_table.blocks], 0)  # one process: every row
        for rows, variable in table.blocks:
            mapped = source_rows[rows.first:rows.stop]
            kept = variable[:rows.count]
            taken_rows = tf.gather(whole, np.maximum(mapped, 0))
            variable[:rows.count].assign(tf.where(tables.per_row(mapped >= 0, kept), taken_rows, kept))
    state.ema.start_at_targets()
    shared = int(np.sum(source_rows >= 0))
    return (f"initialised from {checkpoint}: the LSTM and the rows of {shared:,} of this vocabulary's "
            f"{len(vocab):,} words (in both vocabularies); {len(vocab) - shared:,} new word(s) start as in a fresh "
            "run; Adagrad's accumulators, the averages, the step and the learning rate start fresh")


def keep_vocabulary(logdir, datadir):
    """The run's copy of its vocabulary, for a later --init_from (rank 0, at the start)."""
    target = os.path.join(logdir, VOCAB_COPY)
    if not os.path.exists(target):
        with open(os.path.join(datadir, dataset.VOCAB_FILE), "rb") as handle:
            console.write_atomically(target, handle.read())
