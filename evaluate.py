"""
Evaluation: how well a model predicts a split, during training and at its end.

- estimate_loss, at every eval_interval: nanoGPT's mean loss over eval_iters random batches of
  each split. The batches come from a generator of their own, seeded alike in every run (not by the
  run's seed), so every evaluation of every run scores the same windows and the curves compare.
- score_split, at the end (max_iters, eval_only): every token of the split once, in
  non-overlapping windows, overall and per domain, in eager mode and large batches. The result is a property of the weights: the same
  checkpoint scores the same whatever its seed, where a sample of windows alone moves one
  checkpoint's score by about ±0.01 nats (measured on configs/remoe.py: std 0.0108 over 8 samples).
"""
import torch
import torch.nn.functional as F

import distributed

EVAL_SEED = 0  # the interim evaluations' windows, the same for every run
SCORE_TOKENS = 8192  # the final score runs this many tokens a forward (at least batch_size rows)

@torch.no_grad()
def estimate_loss(model, batches, eval_iters, ctx, d):
    """{'train', 'val', and 'val_<domain>' per domain of a multidomain dataset}: mean loss over
    eval_iters batches of each split (the domains' losses over those same val batches). Every rank
    evaluates its own rows; the means are averaged over ranks, so all ranks decide alike."""
    out = {}
    domains = batches.domains
    model.eval()
    for split in ('train', 'val'):
        generator = torch.Generator().manual_seed(EVAL_SEED)
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


@torch.no_grad()
def score_split(model, batches, ctx, d, split='val', rows=None):
    """{'val': mean loss over every target token of the split, 'val_<domain>' per domain,
    'val_tokens': how many}: each rank scores its share of the windows (data.Batches.split_windows)
    and the loss sums and token counts are pooled over ranks before dividing. `model` is the
    uncompiled module: the batches are larger than training's (fewer forwards; default
    SCORE_TOKENS tokens each), a shape the compiled graph would recompile for, and the same
    eager path at the end of training and in a later --eval_only gives the same number."""
    rows = rows or max(batches.batch_size, SCORE_TOKENS // batches.block_size)
    domains = batches.domains if split == 'val' else []
    sums = torch.zeros(2, 1 + len(domains), dtype=torch.float64)  # [loss sum, tokens]: all, then each domain
    model.eval()
    for X, Y, mask, dom in batches.split_windows(split, rows):
        with ctx:
            logits, _, _ = model(X, Y)
        token_loss = F.cross_entropy(logits.flatten(0, 1).float(), Y.flatten(), reduction='none').cpu().double()
        keep = mask.flatten()
        token_loss = token_loss[keep]
        sums[:, 0] += torch.stack([token_loss.sum(), torch.tensor(float(len(token_loss)), dtype=torch.float64)])
        if domains:
            d_ids = dom.flatten()[keep]
            sums[0, 1:] += torch.bincount(d_ids, token_loss, minlength=len(domains))
            sums[1, 1:] += torch.bincount(d_ids, minlength=len(domains)).double()
    model.train()
    sums = distributed.all_reduce_sum(sums.to(X.device), d).cpu()
    out = {split: (sums[0, 0] / sums[1, 0]).item(), f'{split}_tokens': int(sums[1, 0].item())}
    for i, name in enumerate(domains):
        out[f'{split}_{name}'] = (sums[0, 1 + i] / sums[1, 1 + i]).item() if sums[1, 1 + i] else float('nan')
    return out


def score_variants(model, batches, ctx, d):
    """{'val_loss_<name>': the val score with the routers set as the router's score_variants() name
    them} (Expert Choice's teacher-forced score beside its causal one); {} for other models. The
    routers are put back as they were, whatever happens."""
    routers = model.routers()
    out = {}
    for name, attrs in (routers[0].score_variants() if routers else {}).items():
        saved = [{k: getattr(r, k) for k in attrs} for r in routers]
        try:
            for r in routers:
                for k, v in attrs.items():
                    setattr(r, k, v)
            out[f'val_loss_{name}'] = score_split(model, batches, ctx, d)['val']
        finally:
            for r, old in zip(routers, saved):
                for k, v in old.items():
                    setattr(r, k, v)
    return out
