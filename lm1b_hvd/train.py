"""`horovodrun -np N python -m lm1b_hvd.train --datadir D --logdir L [--hpconfig k=v,...]`

Trains the LSTMP language model with one Horovod rank per process. Without
--datadir it trains the `demo` preset on the built-in demo corpus for a few
minutes. The log directory is the unit of resumption: run the same command
again to continue. Rank 0 alone prints, writes summaries and saves checkpoints.

Examples:
  horovodrun -np 2 python -m lm1b_hvd.train
  horovodrun -np 8 python -m lm1b_hvd.train --datadir /data/lm1b --logdir runs/lstm-2048-512 --eval_every 5000
  horovodrun -np 2 python -m lm1b_hvd.train --datadir my_corpus --preset corpus --max_time 900 --eval_every 500
  python -m lm1b_hvd.train --preset demo --hpconfig kernels=portable,keep_prob=0.9 --max_steps 300
  horovodrun -np 16 -H node1:8,node2:8 python -m lm1b_hvd.train --datadir /data/lm1b --hpconfig outer_every=64
"""
import argparse
import dataclasses
import os
import sys

from lm1b_hvd import console, hparams
from lm1b_hvd.console import option
from lm1b_hvd.run import loop, watchdog

DEMO_MINUTES = 3


def _first_last(text):
    try:
        first, last = (int(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects FIRST,LAST, got '{text}'") from None
    if not 0 <= first <= last:
        raise argparse.ArgumentTypeError(f"expects FIRST,LAST with 0 <= FIRST <= LAST, got '{text}'")
    return first, last


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The run's settings: each field is the flag --FIELD of the same name and default."""
    datadir: str = option("", "lm1b layout with 1b_word_vocab.txt; empty: the built-in demo corpus")
    logdir: str = option("", "checkpoints and summaries; empty: runs/<preset>")
    preset: str = option("", "hparams preset; empty: 'demo' without --datadir, else 'default'",
                         choices=sorted(hparams.PRESETS))
    hpconfig: str = option("", "hparams overrides k=v,k=v, e.g. num_layers=2,state_size=4096")
    init_from: str = option("", "a new run starts from this trained run's weights (fine-tuning): its log directory, "
                                "its best/, or a checkpoint; words matched by vocabulary, the rest fresh")
    max_steps: int = option(0, "stop after this step; 0: no limit", minimum=0)
    max_time: float = option(0.0, f"seconds of training; 0: no limit (without --datadir and --max_steps: "
                                  f"{DEMO_MINUTES} minutes)", minimum=0.0)
    log_every: int = option(100, "steps between progress lines", minimum=1)
    summary_every: int = option(20, "steps between TensorBoard training scalars", minimum=1)
    eval_every: int = option(0, "steps between heldout evaluations (each keeps the best checkpoint); "
                                "0: only at the end", minimum=0)
    eval_steps: int = option(0, "heldout batches per rank per evaluation; 0: the rank's whole share", minimum=0)
    checkpoint_secs: float = option(600.0, "seconds between checkpoints; 0: none by the clock", minimum=0.0)
    checkpoint_steps: int = option(0, "steps between checkpoints, besides the clock; 0: by the clock only",
                                   minimum=0)
    keep_checkpoints: int = option(5, "latest checkpoints kept (the best one is kept apart)", minimum=1)
    profile_steps: tuple = option((), "FIRST,LAST: a TensorFlow profiler trace of these steps in L/profile",
                                  type=_first_last, metavar="FIRST,LAST")
    allow_cpu: bool = option(False, "train on the CPU even if the job was given GPUs that TensorFlow cannot see")
    elastic: bool = option(False, "Horovod elastic mode: go on when ranks are lost or added "
                                  "(horovodrun --min-np/--max-np, Gloo)")
    ranks_per_node: int = option(0, "two-level runs (hparam outer_every): ranks 0..K-1, K..2K-1, ... form the "
                                    "nodes, e.g. simulated nodes on one host; 0: the hosts Horovod placed the ranks on",
                                 minimum=0)
    commit_steps: int = option(100, "elastic: steps between commits of the state to host memory "
                                    "(what a lost rank costs the others)", minimum=1)
    step_timeout: float = option(0.0, "seconds without a completed step after which every live rank exits "
                                      f"(status {watchdog.EXIT_STALLED}); 0: {watchdog.STEP_FACTOR:.0f}x the slowest "
                                      f"recent step, at least {watchdog.FLOOR_SECONDS:.0f} s, more around checkpoints "
                                      "and evaluations", minimum=0.0)


def parse_args(argv):
    """The TrainConfig of the command line, with the defaults that depend on other flags filled in."""
    parser = console.ArgumentParser(__doc__, "lm1b_hvd.train")
    console.add_options(parser, TrainConfig)
    config = console.from_options(TrainConfig, parser.parse_args(argv))
    preset = config.preset or ("default" if config.datadir else "demo")
    max_time = config.max_time
    if not config.datadir and not (config.max_steps or config.max_time):
        max_time = DEMO_MINUTES * 60.0  # the demo is a few minutes, not an endless run
    return dataclasses.replace(config, preset=preset, logdir=config.logdir or os.path.join("runs", preset),
                               max_time=max_time)


def main(argv=None):
    config = parse_args(argv)
    return console.run_main(lambda: loop.train(config))


if __name__ == "__main__":
    sys.exit(main())
