"""The exchange's cost model, checked on local clusters and projected to GPU nodes.

    python scripts/cluster_cost_model.py measure --hosts 2 4 --preset small --vocab 200000
    python scripts/cluster_cost_model.py measure --hosts 2 --ranks_per_host 2 --outer_every 16 --vocab 20000
    python scripts/cluster_cost_model.py project --replicated rep.log --vocab_parallel vp.log

The model: a step takes its compute time plus the bytes that cross a host's link over the
link's rate, whichever way carries more (links are full duplex):

    step time = compute + max(bytes out, bytes in) / link rate

with the bytes per rank per step that the bench counts from the tensors, turned into what
crosses a link: a ring allreduce sends and receives 2 (N-1)/N times its tensor; an allgather
(a ring too) carries the other ranks' rows both ways; an alltoall carries what it counts.

`measure` runs the bench (replicated and vocab-parallel; with --outer_every H also
vocab-parallel two-level, a host being a node) on scripts/local_cluster.sh with one rank per
host or --ranks_per_host, first on links too fast to matter (the compute time, and the bytes), then at
link rates that give the bytes-per-computed-word budget of 8 x H100 nodes on 100 Gb/s
InfiniBand (--budget, see docs/performance.md), and prints measured against predicted words/s,
at the links' nominal rate and at the part of it (--efficiency) that Gloo's collectives reach.

`project` reads two bench outputs of `default` (replicated and vocab_parallel=true, each at
-np 2) and projects words/s and memory per GPU on 1 to 64 nodes of 8 GPUs, synchronous and
two-level (hparam outer_every: synchronous inside a node, an outer step between nodes every H
steps, update.outer), at each node link rate asked for, with the scaling efficiency against
one node's synchronous vocabulary-parallel words/s.
"""
import argparse
import dataclasses
import math
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lm1b_hvd import hparams  # noqa: E402 (the repository on the path first)
from lm1b_hvd.model.cost import parameter_count  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_MBIT = 20000  # a link rate at which this machine's veth pairs, not tc, set the pace
MODES = {"replicated": "", "vocab_parallel": "vocab_parallel=true"}
TWO_LEVEL = "two-level"  # vocab_parallel inside each host, outer steps between hosts


@dataclasses.dataclass
class BenchFigures:
    """What the model needs from one bench output."""
    ranks: int
    step_seconds: float
    words_per_step: float  # all ranks together
    traffic: dict  # kind -> (sent, received) bytes per rank per step (all ranks', or inside a node two-level)
    peak_gib: float  # the largest rank's
    outer: float = 0.0  # two-level: bytes each rank's outer allreduce sends (and receives) per step

    @classmethod
    def parse(cls, text):
        text = re.sub(r"^\[[\d,]+\]<stdout>:", "", text, flags=re.M)
        step = (re.search(r"^outer steps: .*; with them, ([\d,.]+) ms a step", text, re.M)
                or re.search(r"^step time: median ([\d,.]+) ms", text, re.M))
        words = re.search(r"^words/s: ([\d,]+) over (\d+) rank\(s\) \(([\d,]+) words per rank per step\)", text, re.M)
        peak = re.search(r"^peak memory per rank: (.*)$", text, re.M)
        if not (step and words and peak):
            raise ValueError("not a bench output (no step time, words/s or peak memory line)")
        traffic = {kind: (float(sent.replace(",", "")) * 1e6, float(received.replace(",", "")) * 1e6)
                   for kind, sent, received in re.findall(
                       r"^(allreduce|allgather|alltoall): sent ([\d,.]+) MB, received ([\d,.]+) MB per rank per step",
                       text, re.M)}
        outer = re.search(r"^between nodes, outer [a-z ]+: sent ([\d,.]+) MB", text, re.M)
        if not (traffic or outer):
            raise ValueError("not a bench output of several ranks (no allreduce, allgather or alltoall line)")
        ranks = int(words.group(2))
        return cls(ranks, float(step.group(1).replace(",", "")) / 1e3,
                   ranks * float(words.group(3).replace(",", "")), traffic,
                   max(float(v) for v in re.findall(r"([\d.]+) GiB", peak.group(1))),
                   float(outer.group(1).replace(",", "")) * 1e6 if outer else 0.0)


def link_bytes(figures, per_host=1):
    """(out, in) bytes over one host's link per step, `per_host` ranks on each host (rank
    order fills a host before the next). A ring allreduce or allgather crosses a host's link
    once each way (the ring's one edge out of the host and one in), whatever the ranks per
    host; an alltoall's parts for ranks on other hosts cross it, from each rank of the host.
    Two-level, a step's exchange stays on the host and the outer allreduce of each rank's rows
    runs in a ring of one rank per host."""
    ranks = figures.ranks
    if figures.outer:
        hosts = ranks // per_host
        each_way = per_host * 2 * (hosts - 1) / hosts * figures.outer
        return each_way, each_way
    out = incoming = 0.0
    for kind, (sent, received) in figures.traffic.items():
        if kind == "allreduce":
            out += 2 * (ranks - 1) / ranks * sent
            incoming += 2 * (ranks - 1) / ranks * received
        elif kind == "allgather":
            out += received
            incoming += received
        else:
            remote = (ranks - per_host) / (ranks - 1)
            out += per_host * remote * sent
            incoming += per_host * remote * received
    return out, incoming


def predicted_words_per_second(fast, mbit, efficiency=1.0, per_host=1):
    """The model's words/s at `mbit` from the figures on a fast link: its step time is the
    compute (and whatever the fast link itself costs), plus the bytes at the slower rate, of
    which the collectives reach `efficiency`."""
    heavier = max(link_bytes(fast, per_host))
    seconds = fast.step_seconds + (heavier * 8 / (mbit * 1e6) - heavier * 8 / (FAST_MBIT * 1e6)) / efficiency
    return fast.words_per_step / seconds


def run_bench(hosts, mbit, args, mode):
    per_host = args.ranks_per_host
    name = f"{hosts}hosts{f'x{per_host}' if per_host > 1 else ''}-{mbit}mbit-{mode}{args.label}"
    saved = os.path.join(args.save, f"{name}.log") if args.save else ""
    if args.reuse and os.path.exists(saved):
        return BenchFigures.parse(open(saved).read())
    levels = f"vocab_parallel=true,outer_every={args.outer_every}" if mode == TWO_LEVEL else MODES[mode]
    hpconfig = ",".join(part for part in (levels, args.hpconfig) if part)
    host_list = ",".join(f"10.251.0.{host}:{per_host}" for host in range(1, hosts + 1))  # local_cluster.sh's
    # Over a slow link the first broadcast of rank 0's weights takes minutes; Gloo gives an op 30 s.
    # The cluster's ranks share this machine's cores: MPI must yield them while it waits (it spins
    # by default, which doubles the step's time here).
    bench = (f"HOROVOD_GLOO_TIMEOUT_SECONDS=900 OMPI_MCA_mpi_yield_when_idle=1 "
             f"{os.path.join(os.path.dirname(sys.executable), 'horovodrun')} "
             f"-np {hosts * per_host} -H {host_list} "
             f"--network-interface eth0 --{args.controller} {sys.executable} -m lm1b_hvd.bench --preset {args.preset} "
             f"--vocab {args.vocab} --steps {args.steps} --ranks_per_node {per_host}"
             + (f" --hpconfig {hpconfig}" if hpconfig else ""))
    result = subprocess.run(["bash", os.path.join(REPO, "scripts", "local_cluster.sh"), str(hosts), str(mbit), bench],
                            cwd=REPO, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        sys.exit(f"cluster_cost_model: the bench failed on {hosts} hosts at {mbit} Mbit/s:\n{result.stderr[-2000:]}")
    if saved:
        os.makedirs(args.save, exist_ok=True)
        with open(saved, "w") as out:
            out.write(result.stdout)
    return BenchFigures.parse(result.stdout)


def measure(args):
    print(f"{'hosts':>5} {'mode':>15} {'Mbit/s':>7} {'link MB/step':>12} {'measured w/s':>12} "
          f"{'predicted w/s':>13} {'error':>6} {f'at {args.efficiency:g} x rate':>15} {'error':>6}", flush=True)
    modes = args.modes or list(MODES) + ([TWO_LEVEL] if args.outer_every else [])
    per_host = args.ranks_per_host
    for hosts in args.hosts:
        fast = {mode: run_bench(hosts, FAST_MBIT, args, mode) for mode in modes}
        # The budget's rate for this cluster: its hosts' compute rate (the first mode, fast links) x budget.
        host_words = fast[modes[0]].words_per_step / fast[modes[0]].step_seconds / hosts
        rates = args.mbit or [max(1, round(host_words * args.budget * 8 / 1e6 * factor)) for factor in args.factors]
        for mbit in rates:
            for mode in modes:
                slow = run_bench(hosts, mbit, args, mode)
                measured = slow.words_per_step / slow.step_seconds
                nominal = predicted_words_per_second(fast[mode], mbit, per_host=per_host)
                effective = predicted_words_per_second(fast[mode], mbit, args.efficiency, per_host)
                print(f"{hosts:>5} {mode:>15} {mbit:>7} {max(link_bytes(slow, per_host)) / 1e6:>12.2f} "
                      f"{measured:>12,.0f} {nominal:>13,.0f} {100 * (nominal / measured - 1):>+5.0f}% "
                      f"{effective:>15,.0f} {100 * (effective / measured - 1):>+5.0f}%", flush=True)


def log_uniform(vocab):
    """P(id) of each id under the log-uniform (Zipfian) law of the sampled softmax's proposal."""
    ids = np.arange(vocab, dtype=np.float64)
    return np.log1p(1.0 / (ids + 1.0)) / math.log(vocab + 1.0)


def rows_seen(probabilities, draws):
    """The expected number of ids drawn at least once in `draws` independent draws."""
    return float(np.sum(-np.expm1(draws * np.log1p(-probabilities))))


def draws_for_unique(probabilities, unique):
    """How many draws give `unique` distinct ids on average: what the sampler takes a step."""
    low, high = float(unique), 1e12
    while high - low > 1.0:
        middle = (low + high) / 2
        low, high = (middle, high) if rows_seen(probabilities, middle) < unique else (low, middle)
    return high


@dataclasses.dataclass
class OuterLevers:
    """What an outer step sends and how (project's --outer_* flags): `bits` 16 (fp16), 32 (fp32),
    8 or 4 (row-wise, a float32 scale a row, error feedback); `slots` averaged (their increments
    travel beside the deltas, at 16 or 32 bits) or local; `overlap` 0 (none) or the overhead
    factor of an overlapped period over the larger of its compute and its exchange."""
    bits: int = 16
    slots: str = "averaged"
    overlap: float = 0.0

    def __str__(self):
        sent = {32: "fp32", 16: "fp16"}.get(self.bits, f"{self.bits} bits")
        return (f"deltas in {sent}, accumulators {self.slots}"
                + (f", overlapped (a period x {self.overlap:g})" if self.overlap else ""))


def outer_levers(args):
    bits = 32 if args.outer_precision == "fp32" and args.outer_bits == 16 else args.outer_bits
    return OuterLevers(bits, args.outer_slots, args.overlap)


def outer_bytes(levers, values, rows, row_count):
    """Bytes one node's outer step hands to its collectives: a float per row saying which
    changed, the changed rows' deltas (in 8 or 4 bits with a float32 scale a row), and with
    averaged accumulators their increments (fp16 but with fp32 deltas)."""
    if levers.bits >= 16:
        deltas = values * levers.bits / 8
    else:
        deltas = values * levers.bits / 8 + 4 * rows
    increments = 0.0 if levers.slots == "local" else values * (4 if levers.bits == 32 else 2)
    return 4 * row_count + deltas + increments


def outer_state_floats(levers):
    """Floats of outer state per parameter a GPU owns: anchors and momentum, accumulators at
    the anchors (averaged) or kept (local), the residuals of a quantized exchange (what it sent,
    and the 1/N it averages: counted whole), and an overlapped exchange's start, own change and
    two means."""
    return 3 + (2 if levers.bits < 16 else 0) + (4 if levers.overlap else 0)


def project(args):
    """Nodes of --gpus GPUs: every byte a GPU receives crosses its NVLink port; what comes from
    other nodes crosses the node's one link first. The allreduce is hierarchical
    (HOROVOD_HIERARCHICAL_ALLREDUCE=1: a ring inside the node, then one between the nodes).
    Per GPU the compute is --gpu_words words/s. Two-level, a step's exchange stays inside the
    node, and every H steps each GPU's set across the nodes ring-allreduces a float per row it
    owns (which rows changed) and the changed rows of its 1/g of the parameters' deltas and
    Adagrad accumulator increments (fp16, or fp32 with --outer_precision fp32), then the node gathers
    the LSTM's over NVLink: per step, that outer step's bytes / H. Which rows changed in H
    steps of all nodes: all the LSTM's; of the embedding, the words read; of the softmax, the
    words read and the sampled candidates. Both are counted as log-uniform draws: the
    candidates are, and real words are rarer in the tail (lm1b's rarest have 3 in 0.8B), so the
    embedding's figure is an upper bound."""
    figures = {mode: BenchFigures.parse(open(path).read())
               for mode, path in (("replicated", args.replicated), ("vocab_parallel", args.vocab_parallel))}
    for mode, fig in figures.items():
        if fig.ranks != 2:
            sys.exit(f"cluster_cost_model: the {mode} bench ran on {fig.ranks} ranks; project needs -np 2")
    words_per_gpu = figures["replicated"].words_per_step / 2
    compute = words_per_gpu / args.gpu_words
    dense = figures["replicated"].traffic["allreduce"][0]
    own_rows = figures["replicated"].traffic["allgather"][0]
    # At 2 ranks half of a step's unique rows are the other rank's: all of them cost twice that.
    all_rows = 2 * max(figures["vocab_parallel"].traffic["alltoall"])
    tables = 2 * (figures["replicated"].peak_gib - figures["vocab_parallel"].peak_gib)  # the half VP does not hold
    default = hparams.build("default")
    counts = parameter_count(default, args.vocab)
    zipf = log_uniform(args.vocab)
    candidate_draws = draws_for_unique(zipf, default.num_sampled)
    row_count = 3 * args.vocab  # the embedding's, softmax weights' and bias' rows (the LSTM's few thousand aside)
    g, nvlink = args.gpus, args.nvlink_gbyte * 1e9
    levers = outer_levers(args)
    print(f"compute {compute * 1e3:.2f} ms per step ({words_per_gpu:,.0f} words per GPU at {args.gpu_words:,.0f} "
          f"words/s); NVLink {args.nvlink_gbyte:g} GB/s per GPU; an outer step moves the changed rows of "
          f"{2 * 4 * counts.total / 1e9:.2f} GB of deltas and accumulators (fp32), as {levers}; the sampler draws "
          f"{candidate_draws:,.0f} ids a step for {default.num_sampled:,} candidates")

    def synchronous(nodes, mode, link):
        n = nodes * g
        allreduce_inside, allreduce_between = 2 * (g - 1) / g * dense, 2 * (nodes - 1) / nodes * dense
        if mode == "replicated":
            inside = allreduce_inside + (n - 1) * own_rows
            between = allreduce_between + (nodes - 1) * g * own_rows
            memory = figures["replicated"].peak_gib
        else:
            inside = allreduce_inside + all_rows * (n - 1) / n
            between = allreduce_between + g * all_rows * (n - g) / n
            memory = figures["replicated"].peak_gib - tables + tables / n
        return inside, between, compute + inside / nvlink + between / link, memory

    def changed(nodes, every):
        """(the values, the rows an outer step sends per node: the changed rows'; and the
        fractions of the embedding's and the softmax's rows that changed)."""
        read = nodes * g * every * words_per_gpu
        embedding = rows_seen(zipf, read) / args.vocab
        softmax = rows_seen(zipf, read + nodes * g * every * candidate_draws) / args.vocab
        values = counts.lstm + embedding * counts.embedding + softmax * counts.softmax
        rows = (embedding + 2 * softmax) * args.vocab + (default.emb_size + default.projected_size + 2)
        return values, rows, embedding, softmax

    def two_level(nodes, every, link):
        """Vocabulary-parallel inside each node (the better mode there)."""
        inside, _, step, memory = synchronous(1, "vocab_parallel", link)
        if nodes == 1:
            return inside, 0.0, step, memory
        values, rows = changed(nodes, every)[:2]
        outer = outer_bytes(levers, values, rows, row_count)
        between = 2 * (nodes - 1) / nodes * outer / every
        gathered = (g - 1) / g * 2 * 4 * counts.lstm / every  # the node gathers the LSTM rows its GPUs own
        computed = step + gathered / nvlink
        if levers.overlap:  # a period costs the larger of its compute and its exchange, times the overhead
            step = max(computed, between / link) * levers.overlap
        else:
            step = computed + between / link
        memory += outer_state_floats(levers) * 4 * counts.total / g / 2 ** 30  # each GPU's 1/g of the rows
        return inside + gathered, between, step, memory

    print("rows changed in an outer period (embedding, softmax): " + "; ".join(
        f"{nodes} nodes H={every} {100 * changed(nodes, every)[2]:.0f}%, "
        f"{100 * changed(nodes, every)[3]:.0f}%" for nodes in args.nodes[1:2] + args.nodes[-1:]
        for every in args.outer_every))
    for gbit in args.link_gbit:
        link = gbit * 1e9 / 8
        one_node = synchronous(1, "vocab_parallel", link)[2]
        print(f"\n{gbit:g} Gb/s per node")
        print(f"{'nodes':>5} {'GPUs':>5} {'mode':>24} {'NVLink MB':>9} {'node link MB':>12} {'step ms':>8} "
              f"{'words/s':>12} {'efficiency':>10} {'GiB per GPU':>11}")
        for nodes in args.nodes:
            rows = [(mode, synchronous(nodes, mode, link)) for mode in MODES]
            rows += [(f"two-level H={every}", two_level(nodes, every, link)) for every in args.outer_every]
            for mode, (inside, between, step, memory) in rows:
                words = nodes * g * words_per_gpu / step
                efficiency = words / (nodes * g * words_per_gpu / one_node)
                print(f"{nodes:>5} {nodes * g:>5} {mode:>24} {inside / 1e6:>9,.0f} {between / 1e6:>12,.1f} "
                      f"{step * 1e3:>8.1f} {words:>12,.0f} {100 * efficiency:>9.0f}% {memory:>11.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("measure", help="bench on local clusters against the model")
    run.add_argument("--hosts", type=int, nargs="+", default=[2, 4], help="cluster sizes (default: 2 4)")
    run.add_argument("--ranks_per_host", type=int, default=1, help="ranks on each host (default: 1)")
    run.add_argument("--modes", nargs="+", choices=[*MODES, TWO_LEVEL],
                     help="the modes to measure (default: both synchronous ones, and two-level with --outer_every)")
    run.add_argument("--outer_every", type=int, default=0,
                     help="also measure two-level (vocabulary-parallel inside a host) with this outer period")
    run.add_argument("--preset", default="small", help="the bench's preset (default: small)")
    run.add_argument("--vocab", type=int, default=200_000, help="the bench's vocabulary (default: 200000)")
    run.add_argument("--hpconfig", default="", help="more hparams for the bench")
    run.add_argument("--steps", type=int, default=6, help="timed steps per bench (default: 6)")
    run.add_argument("--budget", type=float, default=12.5e9 / (8 * 1e6),
                     help="link bytes per computed word (default: 1562.5, 100 Gb/s for 8 GPUs at 1M words/s each)")
    run.add_argument("--save", default="", help="a folder to keep each bench's output in")
    run.add_argument("--label", default="", help="added to the names of the saved outputs (runs of other --hpconfig)")
    run.add_argument("--controller", choices=["gloo", "mpi"], default="gloo",
                     help="how horovodrun launches (mpi: for hparam outer_overlap; default: gloo)")
    run.add_argument("--reuse", action="store_true", help="read the outputs already in --save instead of running")
    run.add_argument("--efficiency", type=float, default=0.75,
                     help="the part of a link's rate the collectives reach, for the last columns (default: 0.75, "
                          "fitted to 2 hosts replicated at 59 Mbit/s in docs/performance.md)")
    run.add_argument("--mbit", type=int, nargs="*", default=None,
                     help="link rates to measure (default: the budget's rate times each of --factors)")
    run.add_argument("--factors", type=float, nargs="+", default=[1.0, 4.0],
                     help="multiples of the budget's rate to measure at (default: 1 4)")
    proj = commands.add_parser("project", help="default's words/s and memory on nodes of GPUs")
    proj.add_argument("--replicated", required=True, help="bench output of default at -np 2")
    proj.add_argument("--vocab_parallel", required=True, help="bench output of default, vocab_parallel=true, -np 2")
    proj.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 4, 16, 64])
    proj.add_argument("--gpus", type=int, default=8, help="GPUs per node (default: 8)")
    proj.add_argument("--gpu_words", type=float, default=1e6, help="words/s one GPU computes (default: 1M)")
    proj.add_argument("--link_gbit", type=float, nargs="+", default=[25.0, 100.0, 400.0],
                      help="each node's link, Gb/s (default: 25 100 400)")
    proj.add_argument("--outer_every", type=int, nargs="*", default=[64, 256, 1024],
                      help="two-level outer periods H to project (default: 64 256 1024)")
    proj.add_argument("--outer_precision", choices=["fp16", "fp32"], default="fp16",
                      help="16 bits as fp16 or fp32 between nodes (hparam outer_fp16; default: fp16)")
    proj.add_argument("--outer_bits", type=int, choices=[16, 8, 4], default=16,
                      help="the deltas between nodes in 16 bits, or row-wise in 8 or 4 (hparam outer_bits)")
    proj.add_argument("--outer_slots", choices=["averaged", "local"], default="averaged",
                      help="Adagrad's accumulators averaged between nodes or kept per node (hparam outer_slots)")
    proj.add_argument("--overlap", type=float, default=0.0,
                      help="the exchange overlapped with the next period (hparam outer_overlap): the overhead factor "
                           "of a period over the larger of its compute and its exchange, as measured (0: none)")
    proj.add_argument("--vocab", type=int, default=793_470, help="the vocabulary (default: lm1b's 793,470)")
    proj.add_argument("--nvlink_gbyte", type=float, default=150.0,
                      help="what a GPU's exchange reaches over NVLink, GB/s (default: 150)")
    args = parser.parse_args(argv)
    measure(args) if args.command == "measure" else project(args)


if __name__ == "__main__":
    main()
