"""Multi-process data-parallel adaptation with ``torch.distributed`` (the only module that talks to process groups).

Launched by ``torchrun --nproc_per_node=N -m queryshift run ...`` (gloo on CPU, NCCL on GPU). Every rank
encodes a contiguous shard of each query batch; :func:`all_gather_with_grad` joins the shards into the
global batch in rank order (= stream order), so every statistic a method computes over the batch
(in-batch candidates, entropy thresholds, the queue, uniformity, the gap) is the global one and the loss
is identical on every rank. Its backward hands each rank the gradient of its own shard (summed over ranks,
which is the same on all since the losses are), and :func:`average_gradients` all-reduces the parameter
gradients, so every rank takes the same optimizer step and holds identical parameters. Rank 0 writes.

Without an initialised process group (or with one process) every helper is the identity.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "cpu") -> str:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); returns the device this rank uses."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return device


def shard_bounds(n: int, r: int | None = None, world: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous part of a global batch of ``n`` (see :func:`shard`)."""
    r, world = rank() if r is None else r, world_size() if world is None else world
    base, extra = divmod(n, world)
    start = r * base + min(r, extra)
    return start, start + base + (r < extra)


def shard(items: list, r: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous part of a global batch (sizes differ by at most one, earlier ranks larger)."""
    start, stop = shard_bounds(len(items), r, world)
    return items[start:stop]


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        size = torch.tensor([x.shape[0]], device=x.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, dist.get_rank()
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's loss reaches every shard: sum their gradients
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start:start + ctx.sizes[ctx.rank]]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The rows of every rank's ``x`` concatenated in rank order; gradients flow back to each rank's rows."""
    return _GatherWithGrad.apply(x) if active() else x


def all_gather_rows(rows: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's ``rows`` (n_r x P, n_r may differ and be 0) and their integer ``keys`` (n_r), concatenated
    in rank order on every rank; no gradient. The identity in one process."""
    if not active():
        return rows, keys
    with torch.no_grad():
        return _GatherWithGrad.apply(rows), _GatherWithGrad.apply(keys.double()).long()


def average_gradients(params) -> None:
    """All-reduce (mean) the parameters' gradients in one flat buffer. A gradient missing on one rank counts
    as zeros; missing on every rank it stays None (so the optimizer skips that parameter as it would in one
    process)."""
    if not active():
        return
    params = list(params)
    present = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
                     + [present])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    present = flat[-len(params):].tolist()
    offset = 0
    for p, has_grad in zip(params, present):
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone() if has_grad > 0 else None
        offset += n


def average_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """All-reduce (mean) a list of same-device tensors (e.g. hand-built gradients) in one call."""
    if not active() or not tensors:
        return list(tensors)
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def check_identical(tensors, what: str = "parameters") -> None:
    """Raise if the tensors differ between ranks (bitwise): data-parallel adaptation must keep them equal."""
    if not active():
        return
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, flat)
    for r, other in enumerate(parts):
        if not torch.equal(other, parts[0]):
            diff = float((other - parts[0]).abs().max())
            raise RuntimeError(f"rank {r} holds different {what} than rank 0 (max |difference| {diff:.3g})")


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (pickled)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()
