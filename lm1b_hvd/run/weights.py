"""A finished run's weights read into one process: its model and averages, no optimizer. What
`score`, `sample` and `export` use (lm1b_hvd.inference), and what `train --init_from` starts a
new run from (run.init_from)."""
import os
import typing

from lm1b_hvd.data import dataset, vocab as vocab_lib
from lm1b_hvd.model.language_model import LSTMPLanguageModel
from lm1b_hvd.model.pieces import ModelWeights
from lm1b_hvd.run import checkpoints


class RunWeights(typing.NamedTuple):
    """What reading a run's weights needs: its model and averages, no optimizer."""
    hps: object  # the run's HParams
    vocab: vocab_lib.Vocabulary
    state: ModelWeights  # the model and its EMA; restore(path) reads them


def run_weights(logdir, datadir, precision=None):
    """The RunWeights of the run in `logdir`, with the vocabulary of `datadir` (a folder holding
    the vocabulary file: the corpus, or the run's own copy) checked against it; `precision`
    overrides the run's compute precision. The compute plan is this machine's (kernels=auto),
    whatever the run trained with: a run trained on CPUs is read on a GPU too."""
    hps = checkpoints.load_run_hparams(logdir)
    words = vocab_lib.load(os.path.join(datadir, dataset.VOCAB_FILE))
    checkpoints.check_or_write_hparams(logdir, hps, len(words), write=False)
    # One process holds every row, whichever way the run's ranks held them.
    here = hps.replace(kernels="auto", vocab_parallel=False,
                       **(dict(precision=precision, xla=False) if precision else {}))
    return RunWeights(hps, words, ModelWeights(LSTMPLanguageModel(here, len(words))))
