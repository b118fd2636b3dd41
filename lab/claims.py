"""
The papers' claims, decided on a bake-off's numbers by the lab's one verdict rule (lab.verdict: paired seed
by seed, "holds" beyond two standard errors): the trends along one setting (TRENDS), and every claim of the
seed papers and of the routers people train today that a bake-off's entries can test (claims),
each entry found by its kind (lab.report.kind) and setting, never by its label.
"""
import numpy as np

from lab.verdict import numbers, verdict


def _find(rows, name, **setting):
    """The labels of a kind (exactly) with a setting; logs made before a setting existed ran at its default."""
    return [k for k, r in rows.items() if r['kind'] == name
            and all(r['run'].get(key, TREND_DEFAULTS.get(key)) == v for key, v in setting.items())]


def _one(rows, name, exact=False, **setting):
    """The single label of a kind (with a setting, e.g. n_expert=32), or None if there is none or
    several. Without a run of that kind, its unrenormalised twin (name + '-norenorm': an older
    bake-off's top-k) stands in unless `exact`."""
    found = _find(rows, name, **setting) or (
        [] if exact or name.endswith('-norenorm') else _find(rows, name + '-norenorm', **setting))
    return found[0] if len(found) == 1 else None


def _lowest(rows, labels):
    """Of the labels given (None skipped), the one whose mean val loss over the seeds is the lowest: a
    baseline entered at several of its own settings is compared at its best. None if none is given."""
    labels = [label for label in labels if label]
    return min(labels, key=lambda label: np.mean(rows[label]['val'])) if labels else None


# The papers' claims about a trend: how A's gain over B (B − A, seed by seed) moves along one setting.
# (setting, its name in lines, A's kind, B's kind, claim, source, whether the gain should grow)
TRENDS = (
    ('n_expert', 'E', 'remoe', 'topk', "ReMoE's gain over top-k grows with the number of experts",
     'ReMoE Fig. 6b', True),
    ('expert_granularity', 'G', 'remoe', 'topk', 'ReMoE < top-k at every expert granularity',
     'ReMoE §4.3, Fig. 6c', False),
    ('n_layer', 'layers', 'topk-recurrent', 'topk', "RMoE's gain over top-k grows with depth",
     'RMoE Fig. 2', True),
    # ReMoE's own top-k baseline (dMoE) keeps the softmax probabilities as gates: at k = 1 a renormalised
    # gate would always be 1. Its gain at k = 1 (Table 2) against k = 2 (the lab's default K)
    ('top_k', 'k', 'remoe', 'topk-norenorm', "ReMoE < dMoE (top-k, unrenormalised) at each k, and whether the gain "
     "grows with k (no paper claims a direction)", 'ReMoE Table 2 at k = 1', True),
)
TREND_DEFAULTS = {'expert_granularity': 1, 'capacity_factor': 0.0, 'router_lr_scale': 1.0}  # logs made before a setting existed ran at its default


def trend(rows, key, short, a, b, text, source, grows, fixed_a=None, fixed_b=None):
    """Lines for one TRENDS claim: A's gain over B at each value of `key` that has exactly one run of
    each, then (if the claim is that it grows) the gain at each value against the next. The entries
    that differ only in `key` are compared: seed s of all of them saw the same batches, so each
    seed has its own gain at each value, and the change of the gain is paired too. Needs two values.
    fixed_a, fixed_b: settings that pick A's and B's entries where a study has several of a kind
    (the depth study's router learning rates); they are named in the claim."""
    fixed_a, fixed_b = fixed_a or {}, fixed_b or {}
    values = sorted({r['run'].get(key, TREND_DEFAULTS.get(key)) for r in rows.values()})
    found = [(v, _one(rows, a, **fixed_a, **{key: v}), _one(rows, b, **fixed_b, **{key: v})) for v in values]
    gains = {v: np.subtract(rows[lb]['val'], rows[la]['val']) for v, la, lb in found if la and lb}
    if len(gains) < 2:
        return []
    at = ', '.join(f"{who} at {', '.join(f'{k}={v:g}' for k, v in fixed.items())}"
                   for who, fixed in ((a, fixed_a), (b, fixed_b)) if fixed)
    lines = [f'- {text}{f" ({at})" if at else ""} ({source}), {short} by {short}:']
    for v, g in gains.items():  # the gain B − A > 0 is "A < B"
        p = verdict(g, '>')
        lines.append(f'  - at {short}={v}: {a} < {b}: **{p.verdict}**: gain ({b} − {a}) {numbers(p)}')
    if grows:
        order = list(gains)
        for v1, v2 in zip(order, order[1:]):
            p = verdict(gains[v1] - gains[v2], '<')
            lines.append(f'  - gain at {short}={v1} < gain at {short}={v2}: **{p.verdict}**: difference {numbers(p)}')
    return lines


def depth_recipe_claims(rows, loss, paired=None):
    """RMoE's recipe at depth: its routers and top-k's at two learning rates (router_lr_scale) at each
    depth; RMoE's rate is the one configs/rmoe.py should take, top-k keeps the lower one unless the higher
    one beats it. Then RMoE's gain over top-k along depth (RMoE Fig. 2) at each rate, and with each router
    at its better rate (the lower mean val over the seeds and depths) where that pairs two rates; with
    `paired`, how RMoE's gates differ from top-k's at each depth, each at its better rate (GATE_SHAPE).
    Needs RMoE or top-k entries at exactly two rates."""
    rate = lambda r: r['run'].get('router_lr_scale', TREND_DEFAULTS['router_lr_scale'])
    kinds = ('topk-recurrent', 'topk')
    rates = sorted({rate(r) for r in rows.values() if r['kind'] in kinds})
    if len(rates) != 2:
        return []
    low, high = rates
    depths = sorted({r['run'].get('n_layer') for r in rows.values() if r['kind'] in kinds})
    out = []
    for kind, who, a, b, why in (('topk-recurrent', 'RMoE', high, low, 'the rate configs/rmoe.py takes'),
                                 ('topk', 'top-k', low, high, f'configs/topk.py keeps ×{low:g} unless this is reversed')):
        pairs = [(_one(rows, kind, exact=True, n_layer=n, router_lr_scale=a),
                  _one(rows, kind, exact=True, n_layer=n, router_lr_scale=b)) for n in depths]
        pairs = [(x, y) for x, y in pairs if x and y]
        if pairs:
            out.append(f"- {who}'s routers at ×{a:g} the learning rate < at ×{b:g} ({why}; RMoE's recipe at depth), "
                       'depth by depth:')
            for x, y in pairs:
                out.extend(loss(x, y, indent='  '))
    def better(kind):  # the rate with the lower mean val over the seeds and the depths it ran at both
        means = {r: [np.mean(rows[label]['val']) for label in
                     (_one(rows, kind, exact=True, n_layer=n, router_lr_scale=r) for n in depths) if label]
                 for r in rates}
        return min(rates, key=lambda r: np.mean(means[r])) if all(means.values()) else None
    depth = next(t for t in TRENDS if t[0] == 'n_layer')
    pairings = [(low, low), (high, high)]
    best = (better('topk-recurrent'), better('topk'))
    if None not in best and best not in pairings:
        pairings.append(best)
    for ra, rb in pairings:
        out.extend(trend(rows, *depth, fixed_a={'router_lr_scale': ra}, fixed_b={'router_lr_scale': rb}))
    for n in depths if paired and None not in best else ():
        a, b = (_one(rows, kind, exact=True, n_layer=n, router_lr_scale=r) for kind, r in zip(kinds, best))
        if a and b:
            out.append(f"- RMoE's gates against top-k's at {n} layers, each at its better rate (RMoE §6):")
            out.extend(paired(a, b, key, claimed, digits, indent='  ', name=text)
                       for key, claimed, digits, text in GATE_SHAPE if key in rows[a] and key in rows[b])
    return out


def m6t_claims(rows, loss):
    """M6-T's findings (arXiv 2105.15082) as claims, for top-k: more active experts help (each k against the
    next, each k at its better renormalisation, and against dense of the same active size, so that "helps" is
    more than the added compute);
    capacity matters (dropless and each capacity factor against the next smaller one); load imbalance is
    not a significant problem (the aux loss against none); prototyping against top-k, each at its better
    renormalisation. Needs the study's entries: several k, several capacities, or both balance settings."""
    out = []
    def pair(text, source, a, b):
        if a and b:
            out.extend(loss(a, b, name=f'{text} ({source})'))
    def topk(**setting):
        return _one(rows, 'topk', exact=True, **{'capacity_factor': 0.0, **setting})
    def topk_best(**setting):  # dropless top-k at its better renormalisation where both ran: at k = 1 a
        # renormalised gate is always 1 and the router learns nothing from the loss, so k = 1 runs unrenormalised
        return _lowest(rows, [_one(rows, variant, exact=True, **{'capacity_factor': 0.0, **setting})
                              for variant in ('topk', 'topk-norenorm')])
    # M6-T's k: more experts of one size (more compute), so the experts' size of the k = 2 run (configs/topk.py's)
    base = topk_best(top_k=2)
    hidden = {} if base is None else {'ffn_hidden': rows[base]['run'].get('ffn_hidden')}
    ks = sorted({r['run'].get('top_k') for r in rows.values() if r['kind'] in ('topk', 'topk-norenorm')})
    by_k = [(k, topk_best(top_k=k, **hidden)) for k in ks if base and topk_best(top_k=k, **hidden)]
    if len(by_k) > 1:
        out.append('- more active experts help top-k (M6-T abstract), k by k:')
        for (k1, a), (k2, b) in zip(by_k, by_k[1:]):
            out.extend(loss(b, a, indent='  '))
        # each k's top-k against dense of its active size (ffn_hidden = k x an expert's hidden)
        dense = [(k, label, _one(rows, 'dense', ffn_hidden=k * rows[label]['run']['ffn_hidden']))
                 for k, label in by_k if rows[label]['run'].get('ffn_hidden')]
        dense = [(k, a, d) for k, a, d in dense if d]
        if dense:
            out.append('- ... beyond their compute: top-k < dense of the same active size, at each k (what "helps" means '
                       'here; M6-T abstract), k by k:')
            for k, a, d in dense:
                out.extend(loss(a, d, indent='  '))
        if len(dense) > 1:  # more k helps beyond its compute only if the lead over dense grows with k
            out.append("- ... top-k's lead over dense of its active size grows with k (more than the added compute; "
                       "M6-T abstract), k by k:")
            leads = [(k, np.subtract(rows[d]['val'], rows[a]['val'])) for k, a, d in dense]  # dense − top-k, per seed
            for (k1, g1), (k2, g2) in zip(leads, leads[1:]):
                p = verdict(g1 - g2)
                out.append(f'  - lead at k={k1} < lead at k={k2}: **{p.verdict}**: difference {numbers(p)}')
    k = 2  # configs/topk.py's: the capacity, balance and prototyping entries of the study run at it
    cfs = sorted({r['run'].get('capacity_factor', 0.0) for r in rows.values() if r['kind'] == 'topk'} - {0.0})
    by_cf = [(c, _one(rows, 'topk', exact=True, top_k=k, capacity_factor=c)) for c in cfs]
    by_cf = [(c, label) for c, label in by_cf if label]
    dropless = topk(top_k=k)
    if by_cf and dropless:
        out.append('- capacity matters: a larger capacity, a lower loss (M6-T abstract), capacity by capacity:')
        chain = [dropless] + [label for _, label in reversed(by_cf)]  # dropless, then the largest capacity first
        for a, b in zip(chain, chain[1:]):
            out.extend(loss(a, b, indent='  '))
    pair('the aux loss < no balancing, which M6-T finds no significant problem for quality (not decided is '
         'consistent)',
         'M6-T abstract', topk(top_k=k), _one(rows, 'topk-noaux', exact=True, top_k=k))
    # prototyping against top-k, each at its better renormalisation (by mean val over the seeds)
    def best(name):
        found = [_one(rows, variant, exact=True, top_k=k, capacity_factor=0.0) for variant in (name, name + '-norenorm')]
        return _lowest(rows, found) if all(found) else None
    proto, top = best('prototype'), best('topk')
    pair('expert prototyping < top-k, each at its better renormalisation', 'M6-T abstract', proto, top)
    return out


def claims(rows):
    """Each paper claim this bake-off can test, as lines saying whether it holds, with the numbers
    the verdict rule (verdict()) decided on. A claim whose runs are not all in the bake-off (or
    whose kind is there twice) is left out."""
    out = []

    def paired(a, b, key, claimed='<', digits=4, indent='', name=None, domain=None):
        # one line: "A < B" (or >) on rows[a][key] − rows[b][key], seed by seed
        va, vb = ((rows[k]['domains'][domain] if domain else rows[k][key]) for k in (a, b))
        p = verdict(np.subtract(va, vb), claimed)
        what = name or f'{a} {claimed} {b}'
        return (f"{indent}- {what}: **{p.verdict}**: {a} {np.mean(va):.{digits}f} vs {b} {np.mean(vb):.{digits}f}; "
                f"{a} − {b} = {numbers(p, digits)}")

    def loss(a, b, indent='', name=None):
        # a validation-loss claim, and the same claim on each domain's held-out documents
        lines = [paired(a, b, 'val', indent=indent, name=name)]
        lines += [paired(a, b, None, digits=3, indent=indent + '  ', name=f'on {d}', domain=d)
                  for d in rows[a]['domains']]
        return lines

    def claim(text, source, labels):
        # the claim is that the val losses of labels rise in this order: decided link by link; a chain's
        # missing entries are skipped (a study without dense still decides ReMoE < top-k)
        chain, labels = len(labels) > 2, [label for label in labels if label]
        if len(labels) < 2:
            return
        if not chain:
            out.extend(loss(*labels, name=f'{text} ({source})'))
            return
        out.append(f'- {text} ({source}), link by link:')
        for a, b in zip(labels, labels[1:]):
            out.extend(loss(a, b, indent='  '))

    claim('ReMoE < top-k < dense in validation loss', 'ReMoE §4.2, Fig. 6',
          [_one(rows, 'remoe'), _one(rows, 'topk'), _one(rows, 'dense')])
    claim('RMoE < top-k', 'RMoE Table 1', [_one(rows, 'topk-recurrent'), _one(rows, 'topk')])
    claim('expert prototyping < top-k at equal compute', 'M6-T abstract', [_one(rows, 'prototype'), _one(rows, 'topk')])
    claim('recurrent ReMoE < ReMoE (the GRU helps ReLU routing too; no paper tests it)', 'this repo',
          [_one(rows, 'remoe-recurrent'), _one(rows, 'remoe')])
    for args in TRENDS:
        out.extend(trend(rows, *args))
    out.extend(depth_recipe_claims(rows, loss, paired))

    def each(text, source, pairs):
        # one claim over several pairs (A < B each), decided pair by pair; pairs with a missing entry skipped
        pairs = [(a, b) for a, b in pairs if a and b]
        if pairs:
            out.append(f'- {text} ({source}), pair by pair:')
            for a, b in pairs:
                out.extend(loss(a, b, indent='  '))

    # ReMoE Table 2 (E = 8, k = 1): ReMoE lowest of all; Hash, whose routing is not learned, behind every
    # learned router; dMoE (top-k, unrenormalised: a renormalised top-1 gate is always 1) ahead of the
    # other routers of that table; Lory ahead of Hash (the paper shows it in training loss)
    hashed = _one(rows, 'hash')
    if hashed:  # the Table 2 study (its runs at k = 1; a study may add ReMoE and top-k at k = 2: TRENDS)
        table2 = {k: _one(rows, k, top_k=1) for k in ('lory', 'sparsemixer', 'expert_choice', 'topk')}
        # SparseMixer-v2 at its better mask width, where the study tries several (its eps is not in ReMoE)
        mixers = sorted(_find(rows, 'sparsemixer', top_k=1), key=lambda k: rows[k]['run'].get('sparsemixer_eps', 0.01))
        table2['sparsemixer'] = _lowest(rows, mixers)
        if len(mixers) > 1:
            out.append('- SparseMixer-v2 with a wider mask (a larger sparsemixer_eps: more experts sampled, a '
                       'router gradient from the loss on more tokens) < a narrower one (this repo), eps by eps:')
            for a, b in zip(mixers[1:], mixers):
                out.extend(loss(a, b, indent='  '))
        remoe, dmoe, dense = _one(rows, 'remoe', top_k=1), table2['topk'], _one(rows, 'dense')
        each('ReMoE < every other router at k = 1', 'ReMoE Table 2', [(remoe, b) for b in [dense, hashed, *table2.values()]])
        each('every learned router < Hash', 'ReMoE Table 2', [(a, hashed) for a in [remoe, *table2.values()]])
        each('dMoE < the other routers of the table but ReMoE', 'ReMoE Table 2',
             [(dmoe, table2[k]) for k in ('lory', 'sparsemixer', 'expert_choice')] + [(dmoe, hashed)])
        # ReMoE's Hash (id mod E) against Roller et al.'s fixed random table: is Hash's place in the table
        # its modulus (on bytes, mod 8 puts the space alone with few others), or any fixed table?
        claim('Hash by id mod E < Hash by a fixed random table (no paper claim; Roller et al. draw the table)',
              'this repo', [hashed, _one(rows, 'hash-random')])
        lory = table2['lory']
        if lory and None not in rows[lory].get('train', [None]) + rows[hashed].get('train', [None]):
            out.append(paired(lory, hashed, 'train', name='Lory < Hash in training loss (ReMoE §4.2, Table 2), '
                              'the LM loss averaged over the last 100 steps (seed s of both saw the same batches)'))
        ec = table2['expert_choice']
        if ec and 'teacher_forced' in rows[ec].get('variants', {}):
            # EC's training rule sees later tokens of the sequence: scored with it, the same weights look better
            causal, forced = rows[ec]['val'], rows[ec]['variants']['teacher_forced']
            p = verdict(np.subtract(forced, causal), '<')
            out.append(f"- Expert Choice scored with its training rule (teacher-forced, each expert picking from the whole "
                       f"sequence, later tokens included) < scored causally (token choice over the same scores, the "
                       f"score in the tables) (ReMoE Table 2 ran EC; this repo): **{p.verdict}**: {np.mean(forced):.4f} "
                       f"vs {np.mean(causal):.4f}; teacher-forced − causal = {numbers(p, 4)}")
    # RMoE Table 1 (top-2 of 16 there): RMoE ahead of every router it lists; Table 4: a bigger router
    # (SMoE-MLP) does not help; Table 2: the GRU helps XMoE's router too
    rmoe = _one(rows, 'topk-recurrent')
    table1 = {k: _one(rows, k) for k in ('hyperrouter', 'mlp', 'random', 'cosine', 'xmoe')}
    if rmoe and any(table1.values()):  # the Table 1 study
        # (RMoE < top-k, and its MI against top-k's, are claims of every bake-off: above and below)
        each('RMoE < every other router of Table 1', 'RMoE Table 1', [(rmoe, b) for b in table1.values()])
        claim('a linear router < the MLP router of about its size, i.e. the MLP is no better (not decided is '
              'consistent)', 'RMoE Table 4', [_one(rows, 'topk'), table1['mlp']])
        claim('XMoE with the GRU < XMoE', 'RMoE Table 2', [_one(rows, 'xmoe-recurrent'), table1['xmoe']])
        # RMoE Fig. 4: RandomMoE's gates are flat, RMoE's moderate; Table 8: XMoE's IB 19.93, RMoE's 2.02
        if table1['random'] and 'entropy' in rows[rmoe]:
            out.append(paired(rmoe, table1['random'], 'entropy', '<', 3, name="RMoE's gates are more peaked than "
                              "RandomSMoE's (RMoE Fig. 4: RandomMoE flat), the router's entropy in nats"))
        if table1['xmoe'] and 'ib' in rows[rmoe]:
            out.append(paired(rmoe, table1['xmoe'], 'ib', '<', 2, name="RMoE's inner balance is below XMoE's "
                              "(RMoE Table 8: IB 2.02 vs 19.93), the median over tokens of top-1 / top-2 probability"))
        for b in [*table1.values(), _one(rows, 'xmoe-recurrent')]:
            if b:
                out.append(paired(rmoe, b, 'cross_mi', '>', 3, name=f"RMoE's cross-layer MI > {b}'s (RMoE Fig. 3), "
                                  "bits between consecutive layers' expert choices"))
    out.extend(m6t_claims(rows, loss))
    # ReMoE §5.2: its load-balanced L1 (eq. 10-11) against the plain L1 (eq. 9, balance='none'), in loss and
    # in load (Fig. 8b-c: without it some experts die); and, neither balanced, ReLU routing against top-k
    # (Fig. 8a: top-k without balancing falls far behind, ReMoE with the plain L1 does not)
    remoe, plain = _one(rows, 'remoe'), _one(rows, 'remoe-noaux')
    claim("ReMoE's load-balanced L1 < its plain L1", 'ReMoE §5.2, Table 11', [remoe, plain])
    if remoe and plain and None not in (rows[remoe].get('mean_load_cv'), rows[plain].get('mean_load_cv')):
        out.append(paired(plain, remoe, 'mean_load_cv', '>', 3, name="ReMoE's plain L1 leaves the experts' load "
                          "more uneven than its load-balanced L1 (ReMoE Fig. 8b-c), the CV of the load"))
    claim('ReMoE with the plain L1 < top-k without balancing', 'ReMoE §5.2, Fig. 8a', [plain, _one(rows, 'topk-noaux')])
    # RMoE Table 5: passing the state beats not passing it (NP) and passing it detached; detached is
    # worse than no recurrence at all
    rmoe = _one(rows, 'topk-recurrent')
    for variant, what in (('np', 'not passed (NP)'), ('detach', 'passed but detached')):
        claim(f'RMoE < its state {what}', 'RMoE Table 5', [rmoe, _one(rows, f'topk-recurrent-{variant}')])
    claim('top-k < RMoE with the state detached', 'RMoE Table 5', [_one(rows, 'topk'), _one(rows, 'topk-recurrent-detach')])
    claim('renormalised top-k gates < unrenormalised', 'RMoE and CompeteSMoE code; this repo',
          [_one(rows, 'topk', exact=True), _one(rows, 'topk-norenorm')])
    # the routers people train today (issue: is ReMoE's gain its gradient?)
    deepseek = _one(rows, 'topk-sigmoid-bias-seqaux')
    claim("DeepSeek-V3's router < top-k", 'DeepSeek-V3 §2.1.2', [deepseek, _one(rows, 'topk')])
    claim("ReMoE < DeepSeek-V3's router", "ReMoE's thesis against today's default", [_one(rows, 'remoe'), deepseek])
    for suffix, what in (('', ''), ('-fwd', ' (its defaults in the output too)')):
        dense = _one(rows, 'topk-densegrad' + suffix)
        claim(f'top-k with a dense router gradient{what} < top-k', 'Default MoE §4', [dense, _one(rows, 'topk')])
        claim(f'ReMoE < top-k with a dense router gradient{what}', "ReMoE's thesis, more than the gradient",
              [_one(rows, 'remoe'), dense])
    claim("Default MoE's defaults in the router's gradient only < in the output too", 'this repo',
          [_one(rows, 'topk-densegrad'), _one(rows, 'topk-densegrad-fwd')])
    claim('loss-free bias balancing < the Switch aux loss in validation loss', 'arXiv 2408.15664',
          [_one(rows, 'topk-bias'), _one(rows, 'topk')])
    biased, aux = _one(rows, 'topk-bias'), _one(rows, 'topk')
    if biased and aux:  # the paper's MaxVio is the largest overload; the load CV is its spread
        for key, what in (('mean_load_cv', 'CV of the load averaged over the last 100 steps'),
                          ('step_load_cv', "CV of each step's load, averaged over the last 100 steps")):
            if None not in rows[biased][key] + rows[aux][key]:
                out.append(paired(biased, aux, key, digits=3, name='loss-free bias balancing balances the load '
                                  f'better than the aux loss (arXiv 2408.15664), {what}, mean over layers'))
    remoe = _one(rows, 'remoe')
    if remoe and 'rho' in rows[remoe]:
        p = verdict(rows[remoe]['rho'], '<')  # the difference from 0: no correlation
        out.append(f"- rare tokens get more experts under ReMoE (ReMoE Fig. 7): **{p.verdict}**: Spearman ρ "
                   f"between a token's training frequency and its experts per layer (< 0: rare tokens get more) "
                   f"= {numbers(p, 2)}")
    topk = _one(rows, 'topk')
    if remoe and topk and 'domain_mi' in rows[remoe]:
        out.append(paired(remoe, topk, 'domain_mi', '>', 3, name="ReMoE's experts specialise by domain more than "
                          "top-k's (ReMoE Fig. 9), I(domain; expert) in bits, mean over layers (0 = none)"))
    rmoe = _one(rows, 'topk-recurrent')
    if rmoe and topk:
        out.append(paired(rmoe, topk, 'cross_mi', '>', 3, name="RMoE's routing carries more information from "
                          "layer to layer (RMoE Fig. 3), mutual information between consecutive layers' expert "
                          "choices in bits"))
        for key, claimed, digits, text in GATE_SHAPE:  # how RMoE's gates differ from top-k's (RMoE §6)
            if key in rows[rmoe] and key in rows[topk]:
                out.append(paired(rmoe, topk, key, claimed, digits, name=text))
    return out


# RMoE §6 on its gates against top-k's (SMoE's): (row key, claimed, digits, the claim); each a mean over
# layers, the gate statistics over the last 100 training steps (lab.report)
GATE_SHAPE = (
    ('entropy', '>', 3, "RMoE's gates are less peaked than top-k's (RMoE Fig. 4: SMoE near one-hot, RMoE "
     "moderate), the router's entropy in nats"),
    ('ib', '<', 2, "RMoE's inner balance is below top-k's (RMoE Table 8: IB 2.02 vs 34.68), the median over "
     "tokens of top-1 / top-2 probability"),
    ('ob', '<', 3, "RMoE's outer balance is below top-k's (RMoE Table 8: OB 0.573 vs 0.915), the probability "
     "its kept experts hold"),
    ('mean_load_cv', '>', 3, "RMoE's expert load is less balanced than top-k's (RMoE Fig. 12: \"slightly more "
     "imbalanced\"), the load's CV"),
    ('expert_cos', '<', 4, "RMoE's experts are less alike than top-k's (RMoE Fig. 5), the mean cosine similarity "
     "of two experts' weights"),
)
