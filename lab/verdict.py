"""
The lab's one verdict rule: a claim "A < B" decided seed by seed on the per-seed differences A − B
(verdict), the numbers it was decided on in words (numbers), and the rule in words for a report (RULE).
lab.claims applies it to the papers' claims.
"""
import collections
import math

import numpy as np

HOLDS, REVERSED, UNDECIDED, ONE_SEED = 'holds', 'reversed', 'not decided at this scale', 'one seed: not decided'
Paired = collections.namedtuple('Paired', 'verdict mean se t agree n diffs')


def verdict(diffs, claimed='<'):
    """The lab's one rule for a claim "A < B" (claimed='<'; '>' for "A > B"), decided on the
    per-seed differences A − B. Seed s of every entry trains on the same batches and is scored on
    the same validation tokens, so what the seeds share cancels in A − B; what is left is the
    noise of the difference itself, however far apart the seeds' own losses are.
    mean: the mean difference; se: its standard error, std(differences, n − 1) / √n; t = mean / se.
      'holds': the mean is more than 2 se from 0 in the claimed direction;
      'reversed': more than 2 se from 0 the other way;
      'not decided at this scale': otherwise (a NaN difference included);
      'one seed: not decided': a single seed has no standard error (se and t are None).
    Returns Paired(verdict, mean, se, t, agree, n, diffs), agree: the seeds whose difference has the
    claimed sign."""
    d = np.asarray(diffs, float)
    sign = -1.0 if claimed == '<' else 1.0
    n, mean, agree = len(d), float(d.mean()), int(np.sum(sign * d > 0))
    if n < 2:
        return Paired(ONE_SEED, mean, None, None, agree, n, d.tolist())
    se = float(d.std(ddof=1) / np.sqrt(n))
    toward = sign * mean  # > 0: in the claimed direction
    decided = HOLDS if toward > 2 * se else REVERSED if -toward > 2 * se else UNDECIDED
    t = mean / se if se > 0 else float('nan') if mean == 0 else math.copysign(math.inf, mean)
    return Paired(decided, mean, se, t, agree, n, d.tolist())


def numbers(p, digits=4):
    """The numbers a verdict was decided on, in words: mean ± SE, t, agreement, the differences."""
    seeds = ', '.join(f'{x:+.{digits}f}' for x in p.diffs)
    if p.se is None:
        return f'{p.mean:+.{digits}f} (one seed, no standard error)'
    return (f'{p.mean:+.{digits}f} ± {p.se:.{digits}f} SE, t = {p.t:+.1f}, {p.agree} of {p.n} seeds agree; '
            f'per seed {seeds}')


RULE = ('Each claim "A < B" is decided seed by seed (seed s of every entry trained on the same batches and '
        'is scored on the same validation tokens): on the differences A − B, their mean ± standard error '
        '(std over seeds, n − 1, / √n) and t = mean / SE. **holds**: t beyond 2 in the claimed direction; '
        '**reversed**: beyond 2 the other way; otherwise **not decided at this scale**; with one seed, '
        '**one seed: not decided**. With 3 seeds the rule is lenient: were there no difference at all, '
        'about 1 claim in 11 would still "hold" (t with 2 degrees of freedom).')
