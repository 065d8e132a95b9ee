"""One optimiser step of expert-parallel training, equal to single-process training's on the global batch.

The global batch is the single-process one (`sample_batch`, same generator); run rank r takes rows
r B / W .. (r + 1) B / W - 1 (W = E D ranks). Each rank's objective is its share of the global one,

    J_r = (sum of its tokens' cross-entropy) / (global tokens) + coef * aux_r,

where aux_r is its share of the load-balancing loss of the *global* batch: the routing fractions are
all-reduced (they carry no gradient), the mean gate probabilities are each rank's own sum over the global
token count, so sum_r aux_r is exactly `load_balancing_loss` on the whole batch, gradient included.
Since sum_r J_r is the single-process objective, gradients are *summed*: dense ones over all ranks,
expert ones over the ranks holding the same experts (each already holds the gradient of every token
routed to it, from every rank of its copy, by the all-to-all's backward). The clipping norm adds the
dense part once and each expert once.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from training.ep_layer import ExpertParallelMixtral
from training.process_groups import ExpertParallelGroups
from training.train import MAX_GRAD_NORM, TrainConfig, lr_at


@dataclass
class StepResult:
    loss: float  # ce + coef * aux of the global batch, as single-process training reports it
    ce: float
    aux: float
    grad_norm: float  # global, before clipping
    dropped: list[int]  # per layer, slots dropped over capacity on all ranks


def local_rows(batch: torch.Tensor, groups: ExpertParallelGroups) -> torch.Tensor:
    """This rank's slice of the global batch (B, T + 1): B / W rows."""
    B, W = len(batch), groups.world_size
    if B % W:
        raise ValueError(f"batch size {B} does not split over {W} ranks")
    n = B // W
    return batch[groups.rank * n : (groups.rank + 1) * n]


def aux_loss_share(gate_logits: list[torch.Tensor], k: int, n_global: int,
                   group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer logits (N, E) of this rank -> (its share of the global aux loss, layers averaged, the
    global aux loss): `load_balancing_loss` over every rank's tokens, one all-reduce for all layers."""
    probs = torch.stack([F.softmax(g.float(), dim=-1) for g in gate_logits])  # (L, N, E)
    L, _, E = probs.shape
    chosen = probs.topk(k, dim=-1).indices  # (L, N, k)
    counts = F.one_hot(chosen, E).float().sum(1)  # (L, k, E)
    prob_sum = probs.sum(1)  # (L, E), differentiable
    stats = torch.cat([counts.flatten(1), prob_sum.detach()], 1)  # (L, k E + E)
    dist.all_reduce(stats, group=group)
    fraction = stats[:, : k * E].view(L, k, E) / n_global  # (L, k, E) tokens whose slot j chose e
    share = E * (fraction * (prob_sum / n_global)[:, None]).sum((1, 2))  # (L,)
    total = E * (fraction * (stats[:, k * E :] / n_global)[:, None]).sum((1, 2))
    return share.mean(), total.mean()


def reduce_gradients(model: ExpertParallelMixtral) -> None:
    """Sum dense gradients over all ranks and expert gradients over the ranks holding the same experts,
    each as one flat buffer (one collective per group, not one per tensor)."""
    g = model.groups
    experts = [model.w13, model.w2]
    dense = [p for p in model.parameters() if all(p is not e for e in experts)]
    for params, group, size in ((dense, g.dense_grads, g.world_size), (experts, g.expert_grads, g.dp)):
        if size == 1:
            continue
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        for p, reduced in zip(params, _unflatten_dense_tensors(flat, grads), strict=True):
            p.grad = reduced


def clip_gradients(model: ExpertParallelMixtral, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ over the whole model: dense gradients (equal on every rank) counted once,
    the expert slices of one copy summed over its token_exchange group. -> the norm before clipping."""
    experts = [model.w13, model.w2]
    dense = [p.grad for p in model.parameters() if p.grad is not None and all(p is not e for e in experts)]
    dense_sq = sum(g.float().pow(2).sum() for g in dense)
    expert_sq = sum(p.grad.float().pow(2).sum() for p in experts if p.grad is not None)
    expert_sq = torch.as_tensor(expert_sq, dtype=torch.float32, device=model.w13.device).clone()
    dist.all_reduce(expert_sq, group=model.groups.token_exchange)
    norm = (dense_sq + expert_sq).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)  # clip_grad_norm_'s formula
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(coef)
    return norm


def ep_train_step(model: ExpertParallelMixtral, opt: torch.optim.Optimizer, batch: torch.Tensor,
                  cfg: TrainConfig, step: int) -> StepResult:
    """`train.train_step` on the global batch (B, T + 1), this rank computing its slice."""
    g = model.groups
    for group in opt.param_groups:
        group["lr"] = lr_at(step, cfg)
    rows = local_rows(batch, g).to(model.w13.device)
    n_global = len(batch) * (batch.shape[1] - 1)
    logits, gates = model(rows[:, :-1])
    ce_sum = F.cross_entropy(logits.flatten(0, 1), rows[:, 1:].flatten(), reduction="sum")
    aux_share, aux = aux_loss_share(gates, model.args.top_k, n_global, g.dense_grads)
    opt.zero_grad(set_to_none=True)
    (ce_sum / n_global + cfg.aux_loss_coef * aux_share).backward()
    reduce_gradients(model)
    norm = clip_gradients(model, MAX_GRAD_NORM)
    opt.step()
    report = torch.tensor([ce_sum.item(), *model.dropped], dtype=torch.float64, device=model.w13.device)
    dist.all_reduce(report, group=g.dense_grads)
    ce = report[0].item() / n_global
    return StepResult(loss=ce + cfg.aux_loss_coef * aux.item(), ce=ce, aux=aux.item(), grad_norm=norm.item(),
                      dropped=[int(d) for d in report[1:].tolist()])
