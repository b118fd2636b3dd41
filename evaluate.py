"""
Evaluation: how well a model predicts a split, during training and at its end.

estimate_loss is nanoGPT's: the mean loss over eval_iters random batches of each split, the same
batches at every evaluation of a run, so that a run's curve is not noise from the sample.
"""
import torch
import torch.nn.functional as F

import distributed


@torch.no_grad()
def estimate_loss(model, batches, eval_iters, seed, ctx, d):
    """{'train', 'val', and 'val_<domain>' per domain of a multidomain dataset}: mean loss over
    eval_iters batches of each split (the domains' losses over those same val batches). Every rank
    evaluates its own rows; the means are averaged over ranks, so all ranks decide alike."""
    out = {}
    domains = batches.domains
    model.eval()
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(seed)
        losses = torch.zeros(eval_iters)
        domain_sums = torch.zeros(2, len(domains))  # [loss sum, token count] per domain
        for k in range(eval_iters):
            X, Y, ix = batches.get(split, generator)
            with ctx:
                logits, _, info = model(X, Y)
            losses[k] = info['lm_loss'].item()
            if split == 'val' and domains:
                token_loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), reduction='none').cpu()
                dom = batches.target_domains(ix).flatten()
                domain_sums[0] += torch.bincount(dom, token_loss, minlength=len(domains))
                domain_sums[1] += torch.bincount(dom, minlength=len(domains))
        out[split] = losses.mean().item()
    for i, name in enumerate(domains):  # a domain that no eval window reached has no loss: NaN, not 0
        n = domain_sums[1, i].item()
        out[f'val_{name}'] = domain_sums[0, i].item() / n if n else float('nan')
    model.train()
    return dict(zip(out, distributed.all_reduce_mean(torch.tensor(list(out.values())), d).tolist()))
