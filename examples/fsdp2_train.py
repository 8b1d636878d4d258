r"""Train a small transformer with FSDP2 and any danlu optimizer; checkpoint with DCP and resume.

Run on CPU (gloo) with two processes; the second command resumes the first run's checkpoint::

    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py \
        --optimizer adafactor --steps 20 --ckpt /tmp/danlu-ckpt
    torchrun --standalone --nproc_per_node 2 examples/fsdp2_train.py \
        --optimizer adafactor --steps 40 --ckpt /tmp/danlu-ckpt

Any name of ``danlu.list_optimizers()`` works (``lion``, ``tiger``, ``adamw``, ``adax``, ``adafactor``,
``amos``, ``sgdm``, ``egd`` with ``--kwargs '{"signed": true}'``, the wrappers ``eg-step-size`` (with
``'{"meta_lr": 0.01}'``), ``gradient-penalty`` (``'{"strength": 0.01}'``) and ``mgs`` around AdamW, and
``zero-order``); ``--kwargs`` passes hyperparameters as JSON. Closure-driven optimizers get the closure
they need. The task is next-token prediction on sequences of a fixed random permutation
(token t is followed by perm[t]), generated from a seed, so a model that learns the permutation drives
the loss to 0. Each rank trains on its own slice of every batch; the optimizer steps the rank's FSDP2
shards (``danlu._core.distributed``). The checkpoint holds the model, the optimizer and the step, saved
with ``torch.distributed.checkpoint`` (resharded on load, so it resumes on another number of ranks
too). A resumed run takes the same steps as an uninterrupted one: the batches are a function of the
step.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard

import danlu

VOCAB, SEQ, BATCH = 32, 16, 16


class TinyLM(nn.Module):
    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(torch.randn(SEQ, d) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d, heads, dim_feedforward=4 * d, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1])
        for layer in self.layers:
            h = layer(h, src_mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of ``step``: sequences following a fixed permutation."""
    perm = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, VOCAB, (BATCH,), generator=g)
    seq = [start]
    for _ in range(SEQ):
        seq.append(perm[seq[-1]])
    tokens = torch.stack(seq, dim=1)
    per = BATCH // world
    mine = tokens[rank * per:(rank + 1) * per]
    return mine[:, :-1], mine[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--optimizer", default="adafactor")
    parser.add_argument("--kwargs", default="{}", help="JSON hyperparameters for the optimizer")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ckpt", default=None, help="checkpoint directory: resumed if it exists, written at the end")
    args = parser.parse_args()

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = TinyLM()
    for layer in model.layers:
        fully_shard(layer)
    # FSDP2 keeps the root's own parameters (embedding, head) gathered after a forward, for the backward
    # that usually follows. Derivative-free steps run forwards only, between which they perturb the
    # shards: the root must re-gather them for every forward.
    forward_only = args.optimizer.lower() in ("zero-order", "mgs")
    fully_shard(model, reshard_after_forward=forward_only)
    opt = danlu.create_optimizer(args.optimizer, model.parameters(), **json.loads(args.kwargs))

    start = 0
    if args.ckpt and os.path.exists(os.path.join(args.ckpt, ".metadata")):
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": 0}
        dcp.load(sd, checkpoint_id=args.ckpt)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
        start = int(sd["step"])
        if rank == 0:
            print(f"resumed from step {start}")

    loss = torch.zeros(())
    for step in range(start, args.steps):
        x, y = batch(step, rank, world)

        def loss_fn() -> torch.Tensor:
            return nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))

        def closure() -> torch.Tensor:  # zero_grad, forward, backward: what a closure-driven optimizer re-runs
            opt.zero_grad()
            out = loss_fn()
            out.backward()
            return out

        if isinstance(opt, danlu.ZeroOrder):  # derivative-free: the loss only, no backward
            loss = opt.step(loss_fn)
        elif isinstance(opt, danlu.MGS):  # the surrogate's gradient guides a search on the task loss
            loss = opt.step(closure, lambda: float(loss_fn()))
        elif isinstance(opt, danlu.GradientPenalty):
            loss = opt.step(closure)
        else:
            loss = closure()
            opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {float(mean) / world:.6f}")

    if args.ckpt:
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "step": args.steps}
        dcp.save(sd, checkpoint_id=args.ckpt)
    digest = sum(float(p.detach().full_tensor().double().sum()) for p in model.parameters())  # a collective
    if rank == 0:
        print(f"final parameter checksum {digest!r}")
    dist.barrier()  # every rank done with its collectives before the group is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
