"""The lm1b baseline written as a PyTorch user would write it: the reference that
`python -m lm1b_hvd.bench` is compared with in docs/performance.md.

Same model and update as lm1b_hvd's `default` preset: an LSTM with projection (nn.LSTM with
proj_size), dropout before and after it, sparse embeddings for the input words and for the
softmax's rows and biases, a sampled softmax over shared unique log-uniform candidates (the
log expected count subtracted, accidental hits removed), the loss as the token losses' sum over
the batch size, embedding gradients x batch size, the LSTM's gradients clipped by global norm,
Adagrad (accumulators from 1.0) and the LSTM state carried from batch to batch. It times steps
on in-memory batches of Zipf-distributed word ids, as the bench does, and prints the median. The
candidates are drawn before each step's clock starts (the bench's step includes its sampler).

It needs only PyTorch and numpy, in any environment (not this package's):
  python -m venv /tmp/torch && /tmp/torch/bin/pip install torch numpy
  /tmp/torch/bin/python scripts/pytorch_lstm.py                     # LSTM-2048-512, vocabulary 793,470
  /tmp/torch/bin/python scripts/pytorch_lstm.py --preset demo --steps 300
  /tmp/torch/bin/python scripts/pytorch_lstm.py --device cuda --precision bf16 --batch_size 512
"""
import argparse
import math
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional

PRESETS = {  # (vocabulary, batch, steps, emb, state, projection, sampled, keep_prob): lm1b_hvd.hparams' presets
    "default": (793_470, 128, 20, 512, 2048, 512, 8192, 0.9),
    # The demo preset before 8e5acf1 (256 cells, untied): what docs/performance.md compared. The
    # bench's model: --preset demo --hpconfig state_size=256,tie_embeddings=false
    "demo": (2_002, 32, 20, 64, 256, 64, 512, 1.0),
}


class SampledSoftmaxLM(nn.Module):
    def __init__(self, vocab, emb, state, projection, keep_prob):
        super().__init__()
        self.embedding = nn.Embedding(vocab, emb, sparse=True)
        self.lstm = nn.LSTM(emb, state, proj_size=projection, batch_first=True)
        self.softmax_w = nn.Embedding(vocab, projection, sparse=True)
        self.softmax_b = nn.Embedding(vocab, 1, sparse=True)
        self.dropout = nn.Dropout(1.0 - keep_prob)
        for table, fan_in in ((self.embedding, emb), (self.softmax_w, projection)):
            nn.init.uniform_(table.weight, -math.sqrt(3.0 / fan_in), math.sqrt(3.0 / fan_in))
        nn.init.zeros_(self.softmax_b.weight)
        with torch.no_grad():  # TensorFlow's LSTMCell adds 1.0 to the forget gate (PyTorch's gates: i, f, g, o)
            self.lstm.bias_ih_l0[state:2 * state] += 1.0

    def forward(self, x, y, state, candidates, log_q_true, log_q_candidates):
        outputs, state = self.lstm(self.dropout(self.embedding(x)), state)
        h = self.dropout(outputs).reshape(-1, outputs.shape[-1])
        targets = y.reshape(-1)
        true_logits = (h * self.softmax_w(targets)).sum(1) + self.softmax_b(targets)[:, 0] - log_q_true
        candidate_logits = h @ self.softmax_w(candidates).t() + self.softmax_b(candidates)[:, 0] - log_q_candidates
        candidate_logits = candidate_logits.masked_fill(targets[:, None] == candidates[None, :], -1e30)
        logits = torch.cat([true_logits[:, None], candidate_logits], dim=1)
        losses = functional.cross_entropy(logits.float(), torch.zeros_like(targets), reduction="none")
        return losses, tuple(s.detach() for s in state)


def log_uniform_candidates(rng, vocab, count):
    """`count` unique log-uniform ids in draw order, and the draws it took (for the expected counts)."""
    drawn, seen, tries = [], set(), 0
    while len(drawn) < count:
        batch = np.clip(np.floor(np.exp(rng.uniform(0.0, math.log(vocab + 1.0), 2 * count))) - 1, 0, vocab - 1)
        for word in batch.astype(np.int64):
            tries += 1
            if word not in seen:
                seen.add(word)
                drawn.append(word)
                if len(drawn) == count:
                    break
    return np.array(drawn), tries


def log_expected_count(ids, vocab, tries):
    """log of each id's expected count among `tries` log-uniform draws (TensorFlow's formula)."""
    p = (np.log(ids + 2.0) - np.log(ids + 1.0)) / math.log(vocab + 1.0)
    return np.log(-np.expm1(tries * np.log1p(-p)))


def zipf_batch(rng, vocab, batch, steps):
    ids = np.clip(np.floor(np.exp(rng.uniform(0.0, math.log(vocab + 1.0), (batch, steps + 1)))) - 1, 0, vocab - 1)
    ids = ids.astype(np.int64)
    return ids[:, :-1], ids[:, 1:]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="default", choices=sorted(PRESETS))
    parser.add_argument("--batch_size", type=int, default=0, help="rows; default: the preset's")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after warm-up")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16: torch.autocast")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads; default: PyTorch's")
    args = parser.parse_args()
    vocab, batch, steps, emb, state_size, projection, sampled, keep_prob = PRESETS[args.preset]
    batch = args.batch_size or batch
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(1)
    model = SampledSoftmaxLM(vocab, emb, state_size, projection, keep_prob).to(device)
    sparse = [model.embedding.weight, model.softmax_w.weight, model.softmax_b.weight]
    dense = list(model.lstm.parameters())
    optimizers = [torch.optim.Adagrad(dense, lr=0.2, initial_accumulator_value=1.0, eps=0.0),
                  torch.optim.Adagrad(sparse, lr=0.2, initial_accumulator_value=1.0, eps=0.0, foreach=False)]
    rng = np.random.default_rng(1)
    state = (torch.zeros(1, batch, projection, device=device), torch.zeros(1, batch, state_size, device=device))
    batches = [zipf_batch(rng, vocab, batch, steps) for _ in range(4)]
    print(f"pytorch {torch.__version__}: preset {args.preset}, vocabulary {vocab:,}, batch {batch}x{steps}, "
          f"{args.device}, {args.precision}, {torch.get_num_threads()} threads")

    times = []
    for index in range(args.warmup + args.steps):
        x, y = (torch.from_numpy(a).to(device) for a in batches[index % len(batches)])
        candidates, tries = log_uniform_candidates(rng, vocab, sampled)
        log_q_candidates = torch.from_numpy(log_expected_count(candidates, vocab, tries)).float().to(device)
        log_q_true = torch.from_numpy(log_expected_count(y.reshape(-1).cpu().numpy(), vocab, tries)).float().to(device)
        candidates = torch.from_numpy(candidates).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            losses, state = model(x, y, state, candidates, log_q_true, log_q_candidates)
        loss = losses.sum() / batch
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        model.embedding.weight.grad = model.embedding.weight.grad * batch
        nn.utils.clip_grad_norm_(dense, 10.0)
        for optimizer in optimizers:
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if index >= args.warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    print(f"step time: median {median * 1e3:,.1f} ms over {len(times)} steps "
          f"(min {min(times) * 1e3:,.1f}, max {max(times) * 1e3:,.1f}) | loss {loss.item():.3f}")
    print(f"words/s: {batch * steps / median:,.0f}")


if __name__ == "__main__":
    main()
