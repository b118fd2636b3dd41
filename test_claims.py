"""
The lab's verdicts (lab/verdict.py, lab/claims.py): the paired rule seed by seed, trends along a setting, and every
claim of the seed papers found by kind and setting on synthetic rows whose answers are known.
"""
import numpy as np
import pytest

from lab import analysis
from lab import claims as lab_claims
from lab import verdict as lab_verdict


def test_report_claims_find_the_studies_entries():
    def row(kind, gap):  # every seed `gap` above the same per-seed base
        return {'kind': kind, 'run': {'n_expert': 8}, 'val': list(np.array([1.50, 1.55, 1.60]) + gap), 'domains': {},
                'cross_mi': [0.5, 0.6, 0.7]}
    def heads(rows):
        return [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line for line in lab_claims.claims(rows)]
    table5 = {'topk': row('topk', [0, 0, 0]), 'rmoe': row('topk-recurrent', [-0.004, -0.005, -0.003]),
              'rmoe-np': row('topk-recurrent-np', [0.001, -0.001, 0.002]),
              'rmoe-detach': row('topk-recurrent-detach', [0.010, 0.012, 0.011])}
    assert heads(table5)[:4] == ['- RMoE < top-k (RMoE Table 1): holds',
                             '- RMoE < its state not passed (NP) (RMoE Table 5): holds',
                             '- RMoE < its state passed but detached (RMoE Table 5): holds',
                             '- top-k < RMoE with the state detached (RMoE Table 5): holds']
    modern = {'topk': row('topk', [0, 0, 0]), 'deepseek': row('topk-sigmoid-bias-seqaux', [-0.002, 0.001, 0.0]),
              'topk-dense': row('topk-densegrad', [-0.003, -0.004, -0.002]),
              'remoe': row('remoe', [0.010, 0.012, 0.011])}
    assert heads(modern)[:6] == ['- ReMoE < top-k < dense in validation loss (ReMoE §4.2, Fig. 6), link by link:',
                                 '  - remoe < topk: reversed',  # no dense in the study: the link that is there
                                 "- DeepSeek-V3's router < top-k (DeepSeek-V3 §2.1.2): not decided at this scale",
                                 "- ReMoE < DeepSeek-V3's router (ReMoE's thesis against today's default): reversed",
                                 '- top-k with a dense router gradient < top-k (Default MoE §4): holds',
                                 "- ReMoE < top-k with a dense router gradient (ReMoE's thesis, more than the gradient): reversed"]
    # an older bake-off's unrenormalised top-k still stands in as the baseline; with both, renorm is a claim
    old = {'topk': row('topk-norenorm', [0, 0, 0]), 'remoe': row('remoe', [-0.01, -0.012, -0.011])}
    assert heads(old)[0].startswith('- ReMoE < top-k < dense')
    both = {'topk': row('topk', [-0.03, -0.04, -0.035]), 'topk-old': row('topk-norenorm', [0, 0, 0])}
    assert heads(both) == ['- renormalised top-k gates < unrenormalised (RMoE and CompeteSMoE code; this repo): holds']
    # Default MoE both ways: each against top-k, and the two against each other
    ways = {'topk': row('topk-norenorm', [0, 0, 0]), 'bwd': row('topk-densegrad-norenorm', [-0.002, 0.001, 0.0]),
            'fwd': row('topk-densegrad-fwd-norenorm', [0.10, 0.09, 0.11])}
    assert heads(ways) == ['- top-k with a dense router gradient < top-k (Default MoE §4): not decided at this scale',
                           '- top-k with a dense router gradient (its defaults in the output too) < top-k '
                           '(Default MoE §4): reversed',
                           "- Default MoE's defaults in the router's gradient only < in the output too (this repo): holds"]



def test_report_claims_of_the_seeds_tables():
    """ReMoE Table 2 (k = 1, with ReMoE and dMoE at k = 2 too) and RMoE Table 1, looked up by kind."""
    def row(kind, gap, k=1):  # the same active compute at each k: experts of hidden 512 at k = 1, 256 at k = 2
        return {'kind': kind, 'run': {'n_expert': 8, 'top_k': k, 'ffn_hidden': 512 // k},
                'val': list(np.array([1.50, 1.55, 1.60]) + gap),
                'domains': {}, 'cross_mi': list(np.array([0.5, 0.6, 0.7]) + gap)}
    def heads(rows):
        return [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line for line in lab_claims.claims(rows)]
    table2 = {'dense': row('dense', 0.05), 'hash': row('hash', 0.04), 'lory': row('lory', [0.05, 0.03, 0.045]),
              'sparsemixer': row('sparsemixer', 0.02), 'expert_choice': row('expert_choice', 0.03),
              'topk': row('topk-norenorm', 0.01), 'remoe': row('remoe', 0.0),
              'topk-k2': row('topk-norenorm', -0.02, k=2), 'remoe-k2': row('remoe', -0.04, k=2)}
    table2['expert_choice']['variants'] = {'teacher_forced': list(np.array(table2['expert_choice']['val']) - 0.05)}
    lines = heads(table2)
    assert not any(line.startswith('- more active experts help') for line in lines)  # M6-T's k: one expert size
    assert lines[-1] == '- Expert Choice scored with its training rule (teacher-forced, each expert picking from the ' \
                        'whole sequence, later tokens included) < scored causally (token choice over the same ' \
                        'scores, the score in the tables) (ReMoE Table 2 ran EC; this repo): holds'
    assert '- ReMoE < every other router at k = 1 (ReMoE Table 2), pair by pair:' in lines
    at = lines.index('- every learned router < Hash (ReMoE Table 2), pair by pair:')
    assert lines[at + 1:at + 6] == ['  - remoe < hash: holds', '  - lory < hash: not decided at this scale',
                                    '  - sparsemixer < hash: holds', '  - expert_choice < hash: holds',
                                    '  - topk < hash: holds']
    assert '  - topk < expert_choice: holds' in lines  # dMoE ahead of the others
    # SparseMixer-v2 at two mask widths: the table takes the better one, and the widths are a claim of their own;
    # Lory against Hash in training loss
    table2['sparsemixer']['run']['sparsemixer_eps'] = 0.01
    table2['sparsemixer-wide'] = row('sparsemixer', -0.01)
    table2['sparsemixer-wide']['run']['sparsemixer_eps'] = 0.1
    table2['lory']['train'], table2['hash']['train'] = [1.40, 1.41, 1.39], [1.45, 1.47, 1.44]
    table2['hash-random'] = row('hash-random', [0.03, 0.05, 0.04])  # Roller et al.'s table: a kind of its own
    lines = heads(table2)
    assert '- Hash by id mod E < Hash by a fixed random table (no paper claim; Roller et al. draw the table) ' \
           '(this repo): not decided at this scale' in lines
    assert '  - remoe < hash: holds' in lines  # still the mod table's entry: the random one is not 'hash'
    at = lines.index('- SparseMixer-v2 with a wider mask (a larger sparsemixer_eps: more experts sampled, a router '
                     'gradient from the loss on more tokens) < a narrower one (this repo), eps by eps:')
    assert lines[at + 1] == '  - sparsemixer-wide < sparsemixer: holds'
    assert '  - remoe < sparsemixer-wide: reversed' in lines and '  - remoe < sparsemixer: holds' not in lines
    assert '- Lory < Hash in training loss (ReMoE §4.2, Table 2), the LM loss averaged over the last 100 steps ' \
           '(seed s of both saw the same batches): holds' in lines
    # the k trend pairs each k's entries (two top-k kinds alike: told apart by top_k)
    at = lines.index('- ReMoE < dMoE (top-k, unrenormalised) at each k, and whether the gain grows with k (no paper '
                     'claims a direction) (ReMoE Table 2 at k = 1), k by k:')
    assert lines[at + 1] == '  - at k=1: holds'
    assert lines[at + 3] == '  - gain at k=1 < gain at k=2: holds'  # 0.01 at k = 1, 0.02 at k = 2
    table1 = {'topk': row('topk', 0.0, 2), 'rmoe': row('topk-recurrent', -0.01, 2), 'mlp': row('mlp', 0.002, 2),
              'random': row('random', 0.03, 2), 'cosine': row('cosine', 0.01, 2), 'xmoe': row('xmoe', 0.01, 2),
              'hyperrouter': row('hyperrouter', 0.005, 2), 'xmoe-gru': row('xmoe-recurrent', 0.0, 2)}
    lines = heads(table1)
    at = lines.index('- RMoE < every other router of Table 1 (RMoE Table 1), pair by pair:')
    assert [line.split(':')[0] for line in lines[at + 1:at + 6]] == [
        '  - rmoe < hyperrouter', '  - rmoe < mlp', '  - rmoe < random', '  - rmoe < cosine', '  - rmoe < xmoe']
    assert '- XMoE with the GRU < XMoE (RMoE Table 2): holds' in lines
    assert any(line.startswith('- a linear router < the MLP router') and line.endswith('holds') for line in lines)
    assert "- RMoE's cross-layer MI > random's (RMoE Fig. 3), bits between consecutive layers' expert choices: " \
           "reversed" in lines  # (MI here moves with the loss gap: random's is the highest)
    # RMoE §6 on the gates: each statistic paired seed by seed against top-k (and RandomSMoE / XMoE)
    shape = {'entropy': (1.80, 1.95, 2.07), 'ib': (3.0, 2.1, 1.05), 'ob': (0.70, 0.62, 0.30),
             'mean_load_cv': (0.10, 0.08, 0.02), 'expert_cos': (0.006, 0.006, 0.001)}  # top-k, RMoE, random
    for key, (topk, rmoe, random) in shape.items():
        for label, value in (('topk', topk), ('rmoe', rmoe), ('random', random), ('xmoe', topk)):
            table1[label][key] = list(np.array([0.0, 0.01, -0.01]) + value)
    lines = heads(table1)
    assert any(line.startswith("- RMoE's gates are less peaked than top-k's") and line.endswith('holds') for line in lines)
    assert any(line.startswith("- RMoE's inner balance is below top-k's") and line.endswith('holds') for line in lines)
    assert any(line.startswith("- RMoE's outer balance is below top-k's") and line.endswith('holds') for line in lines)
    assert any(line.startswith("- RMoE's expert load is less balanced") and line.endswith('reversed') for line in lines)
    assert any(line.startswith("- RMoE's experts are less alike") and line.endswith('not decided at this scale')
               for line in lines)  # equal per seed: no difference at all
    assert any(line.startswith("- RMoE's gates are more peaked than RandomSMoE's") and line.endswith('holds')
               for line in lines)
    assert any(line.startswith("- RMoE's inner balance is below XMoE's") and line.endswith('holds') for line in lines)

def test_verdict_is_paired_seed_by_seed():
    # a small gap that every seed agrees on holds
    p = lab_verdict.verdict([-0.010, -0.011, -0.009])
    assert p.verdict == 'holds' and p.agree == 3 and p.n == 3
    assert p.mean == pytest.approx(-0.010) and p.se == pytest.approx(0.001 / np.sqrt(3)) and p.t < -2
    # seeds far apart (std 0.05, ten times the gap) but a consistent-sign small gap: still holds
    b = np.array([1.505, 1.556, 1.604])
    a = b - [0.005, 0.006, 0.004]
    assert 0.005 < 2 * max(analysis.mean_std(a)[1], analysis.mean_std(b)[1])  # the old unpaired rule: noise
    assert lab_verdict.verdict(a - b).verdict == 'holds'
    # a sign flip: not decided, however large the mean
    p = lab_verdict.verdict([-0.030, 0.012, -0.020])
    assert p.verdict == 'not decided at this scale' and p.agree == 2
    # a consistent gap the other way: reversed
    assert lab_verdict.verdict([0.010, 0.012, 0.009]).verdict == 'reversed'
    assert lab_verdict.verdict([0.010, 0.012, 0.009], claimed='>').verdict == 'holds'  # "A > B"
    # exactly at 2 SE is not more than 2 SE; a NaN decides nothing
    assert lab_verdict.verdict([-1.0, -3.0]).verdict == 'not decided at this scale'  # mean -2, se 1
    assert lab_verdict.verdict([-0.01, np.nan, -0.01]).verdict == 'not decided at this scale'
    # one seed: no standard error, no verdict
    p = lab_verdict.verdict([-0.5])
    assert p.verdict == 'one seed: not decided' and p.se is None and p.t is None
    assert lab_verdict.numbers(p) == '-0.5000 (one seed, no standard error)'


def test_claims_print_the_numbers_they_decided_on():
    def row(kind, val, n_expert=8, **domains):
        return {'kind': kind, 'run': {'n_expert': n_expert}, 'val': list(val), 'domains': domains}
    dense = np.array([1.60, 1.50, 1.55])  # the seeds far apart, the routers' gaps small and paired
    rows = {'remoe': row('remoe', dense - [0.012, 0.010, 0.011], drama=[1.0, 1.1, 1.2]),
            'topk': row('topk', dense - [0.004, -0.002, 0.003], drama=[1.01, 1.11, 1.21]),
            'dense': row('dense', dense, drama=[1.02, 1.09, 1.23]),
            'prototype': row('prototype', dense + [0.010, 0.011, 0.009], drama=[1.0, 1.1, 1.2])}
    lines = lab_claims.claims(rows)
    text = '\n'.join(lines)
    assert lines[0] == '- ReMoE < top-k < dense in validation loss (ReMoE §4.2, Fig. 6), link by link:'
    assert lines[1].startswith('  - remoe < topk: **holds**: remoe 1.5390 vs topk 1.5483; remoe − topk = -0.0093 ± ')
    assert '0.0013 SE, t = -7.0, 3 of 3 seeds agree; per seed -0.0080, -0.0120, -0.0080' in lines[1]
    assert lines[2].startswith('    - on drama: **holds**: remoe 1.100 vs topk 1.110')
    assert lines[3].startswith('  - topk < dense: **not decided at this scale**:') and '2 of 3 seeds agree' in lines[3]
    assert lines[4].startswith('    - on drama: **not decided at this scale**')  # -0.01, +0.02, -0.02
    assert '- expert prototyping < top-k at equal compute (M6-T abstract): **reversed**' in text
    assert len(lines) == 7  # the claims whose runs are missing are left out
    # ReMoE Fig. 6b: the gain at each E, seed by seed
    rows.update({'topk-e16': row('topk', dense, 16), 'remoe-e16': row('remoe', dense - [0.030, 0.028, 0.033], 16)})
    lines = lab_claims.claims(rows)
    at = lines.index("- ReMoE's gain over top-k grows with the number of experts (ReMoE Fig. 6b), E by E:")
    assert lines[at + 1].startswith('  - at E=8: remoe < topk: **holds**: gain (topk − remoe) +0.0093 ± ')
    assert lines[at + 2].startswith('  - at E=16: remoe < topk: **holds**: gain (topk − remoe) +0.0303 ± ')
    assert lines[at + 3].startswith('  - gain at E=8 < gain at E=16: **holds**: difference -0.0210 ± ')
    assert len(lines) == at + 4  # two topk and two remoe runs: the claims that need one of each are left out


def test_trend_claims_pair_the_gain_seed_by_seed():
    """Granularity (ReMoE §4.3) and depth (RMoE Fig. 2): the gain at each value is decided on its
    own, and a gain that grows is decided on the per-seed change of the gain, not on the means."""
    def row(kind, val, **run):
        return {'kind': kind, 'run': {'n_expert': 8, 'n_layer': 4, **run}, 'val': list(val), 'domains': {}}
    base = np.array([1.50, 1.58, 1.54])  # seeds far apart; the gains small and paired
    rows = {'topk': row('topk', base), 'remoe': row('remoe', base - [0.010, 0.012, 0.011]),  # no key: G = 1
            'topk-g4': row('topk', base - 0.02, expert_granularity=4),
            'remoe-g4': row('remoe', base - 0.02 + [0.001, -0.002, 0.002], expert_granularity=4)}
    assert lab_claims.claims(rows) == lab_claims.trend(rows, *lab_claims.TRENDS[1])  # only the granularity claim applies
    lines = lab_claims.trend(rows, *lab_claims.TRENDS[1])
    assert lines[0] == '- ReMoE < top-k at every expert granularity (ReMoE §4.3, Fig. 6c), G by G:'
    assert lines[1].startswith('  - at G=1: remoe < topk: **holds**')
    assert lines[2].startswith('  - at G=4: remoe < topk: **not decided at this scale**')  # a sign flip
    assert len(lines) == 3  # no "grows" line: the claim is that it holds at every G
    # depth: RMoE's gain grows from 4 to 8 layers in every seed, by 0.005-0.006, on seeds 0.08 apart
    rows = {'topk': row('topk', base), 'rmoe': row('topk-recurrent', base + [0.002, -0.001, 0.001]),
            'topk-8': row('topk', base - 0.05, n_layer=8),
            'rmoe-8': row('topk-recurrent', base - 0.05 + [-0.003, -0.007, -0.004], n_layer=8)}
    lines = lab_claims.trend(rows, *lab_claims.TRENDS[2])
    assert lines[1].startswith('  - at layers=4: topk-recurrent < topk: **not decided at this scale**')
    assert lines[2].startswith('  - at layers=8: topk-recurrent < topk: **holds**')
    assert lines[3].startswith('  - gain at layers=4 < gain at layers=8: **holds**: difference -0.0053 ± ')
    assert lab_claims.trend({'topk': rows['topk'], 'rmoe': rows['rmoe']}, *lab_claims.TRENDS[2]) == []  # one depth


def test_depth_recipe_claims_decide_each_routers_rate_then_the_trend():
    """RMoE's recipe at depth: RMoE and top-k at two router learning rates and two depths. Each router's
    rate is decided depth by depth, then the depth trend at each rate and with each at its better rate."""
    base = np.array([1.50, 1.58, 1.54])
    def row(kind, n_layer, rate, gap):
        return {'kind': kind, 'run': {'n_expert': 8, 'n_layer': n_layer, 'router_lr_scale': rate},
                'val': list(base + gap), 'domains': {}}
    rows = {'topk': row('topk', 4, 0.25, 0.0), 'topk-lr1': row('topk', 4, 1.0, [0.004, 0.006, 0.005]),
            'rmoe': row('topk-recurrent', 4, 0.25, [0.002, 0.0, 0.001]),
            'rmoe-lr1': row('topk-recurrent', 4, 1.0, [-0.001, 0.001, 0.0]),
            'topk-l8': row('topk', 8, 0.25, -0.05), 'topk-l8-lr1': row('topk', 8, 1.0, [-0.048, -0.047, -0.049]),
            'rmoe-l8': row('topk-recurrent', 8, 0.25, [-0.04, -0.041, -0.039]),
            'rmoe-l8-lr1': row('topk-recurrent', 8, 1.0, [-0.06, -0.062, -0.061])}
    lines = [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line
             for line in lab_claims.depth_recipe_claims(rows, lambda a, b, indent='': [
                 f"{indent}- {a} < {b}: **{lab_claims.verdict(np.subtract(rows[a]['val'], rows[b]['val'])).verdict}**"])]
    assert lines[:3] == ["- RMoE's routers at ×1 the learning rate < at ×0.25 (the rate configs/rmoe.py takes; RMoE's "
                         "recipe at depth), depth by depth:",
                         '  - rmoe-lr1 < rmoe: not decided at this scale', '  - rmoe-l8-lr1 < rmoe-l8: holds']
    assert lines[3:6] == ["- top-k's routers at ×0.25 the learning rate < at ×1 (configs/topk.py keeps ×0.25 unless this "
                          "is reversed; RMoE's recipe at depth), depth by depth:",
                          '  - topk < topk-lr1: holds', '  - topk-l8 < topk-l8-lr1: holds']
    heads = [line for line in lines if line.startswith("- RMoE's gain over top-k grows with depth")]
    assert heads == [  # at ×0.25, at ×1, and each at its better rate (RMoE ×1, top-k ×0.25)
        "- RMoE's gain over top-k grows with depth (topk-recurrent at router_lr_scale=0.25, topk at "
        "router_lr_scale=0.25) (RMoE Fig. 2), layers by layers:",
        "- RMoE's gain over top-k grows with depth (topk-recurrent at router_lr_scale=1, topk at router_lr_scale=1) "
        "(RMoE Fig. 2), layers by layers:",
        "- RMoE's gain over top-k grows with depth (topk-recurrent at router_lr_scale=1, topk at "
        "router_lr_scale=0.25) (RMoE Fig. 2), layers by layers:"]
    assert lines[-3:] == ['  - at layers=4: not decided at this scale', '  - at layers=8: holds',
                          '  - gain at layers=4 < gain at layers=8: holds']
    # the generic claims, which need one entry of a kind (RMoE < top-k, the depth trend), stand aside
    assert lab_claims.claims(rows)[0] == lab_claims.depth_recipe_claims(rows, lambda *a, **k: [])[0]
    assert lab_claims.depth_recipe_claims({k: rows[k] for k in ('topk', 'rmoe')}, None) == []  # one rate
    # RMoE §6 on the gates, at each depth, each router at its better rate (RMoE ×1, top-k ×0.25 here)
    for label, r in rows.items():
        r['ob'] = list(np.array([0.70, 0.72, 0.71]) - (0.05 if r['kind'] == 'topk-recurrent' else 0))
    lines = lab_claims.claims(rows)
    at = lines.index("- RMoE's gates against top-k's at 8 layers, each at its better rate (RMoE §6):")
    assert lines[at + 1].startswith("  - RMoE's outer balance is below top-k's") and '**holds**: rmoe-l8-lr1 0.660 ' \
        'vs topk-l8 0.710' in lines[at + 1]


def test_report_claims_of_m6t():
    """M6-T's findings, looked up by kind and setting: k against k and against dense of its active size,
    capacity against capacity, no balancing against the aux loss, prototyping against top-k at its best."""
    def row(kind, gap, k=2, cf=0.0, hidden=256):
        return {'kind': kind, 'run': {'top_k': k, 'capacity_factor': cf, 'ffn_hidden': hidden},
                'val': list(np.array([1.50, 1.55, 1.60]) + gap), 'domains': {}}
    def heads(rows):
        return [line.split(':')[0] + ': ' + line.split('**')[1] if '**' in line else line for line in lab_claims.claims(rows)]
    rows = {'topk-k1': row('topk', 0.03, k=1), 'topk': row('topk', 0.0), 'topk-k4': row('topk', -0.02, k=4),
            'dense-k1': row('dense', 0.04, hidden=256), 'dense': row('dense', 0.02, hidden=512),
            'dense-k4': row('dense', -0.03, hidden=1024),
            'cf1': row('topk', 0.02, cf=1.0), 'cf2': row('topk', [0.001, -0.001, 0.0], cf=2.0),
            'noaux': row('topk-noaux', [0.002, -0.001, 0.001]),
            'topk-norenorm': row('topk-norenorm', 0.01), 'prototype': row('prototype', 0.03),
            'prototype-norenorm': row('prototype-norenorm', 0.02)}
    lines = heads(rows)
    at = lines.index('- more active experts help top-k (M6-T abstract), k by k:')
    assert lines[at + 1:at + 3] == ['  - topk < topk-k1: holds', '  - topk-k4 < topk: holds']
    at = lines.index('- ... beyond their compute: top-k < dense of the same active size, at each k (what "helps" '
                     'means here; M6-T abstract), k by k:')
    assert lines[at + 1:at + 4] == ['  - topk-k1 < dense-k1: holds', '  - topk < dense: holds',
                                    '  - topk-k4 < dense-k4: reversed']
    at = lines.index("- ... top-k's lead over dense of its active size grows with k (more than the added compute; M6-T "
                     "abstract), k by k:")  # leads 0.01, 0.02, -0.01
    assert lines[at + 1:at + 3] == ['  - lead at k=1 < lead at k=2: holds', '  - lead at k=2 < lead at k=4: reversed']
    at = lines.index('- capacity matters: a larger capacity, a lower loss (M6-T abstract), capacity by capacity:')
    assert lines[at + 1:at + 3] == ['  - topk < cf2: not decided at this scale', '  - cf2 < cf1: holds']
    assert '- the aux loss < no balancing, which M6-T finds no significant problem for quality (not decided is ' \
           'consistent) (M6-T abstract): not decided at this scale' in lines
    assert '- expert prototyping < top-k, each at its better renormalisation (M6-T abstract): reversed' in lines
    # k = 1 runs unrenormalised (a renormalised top-1 gate is always 1): each k is taken at its better setting
    rows['topk-k1'] = row('topk-norenorm', 0.03, k=1)
    assert heads(rows)[heads(rows).index('- more active experts help top-k (M6-T abstract), k by k:') + 1] == \
        '  - topk < topk-k1: holds'
    rows['topk-k1-renorm'] = row('topk', 0.05, k=1)  # both at k = 1: the better one stands for k = 1
    assert '  - topk < topk-k1: holds' in heads(rows) and '  - topk < topk-k1-renorm: holds' not in heads(rows)


def test_report_claims_of_remoe_without_load_balancing():
    """ReMoE §5.2: the load-balanced L1 against the plain one (balance='none', kind remoe-noaux) in loss
    and in load, and the plain one against top-k without balancing; left out without their runs."""
    def row(kind, gap, cv=None):
        return {'kind': kind, 'run': {'top_k': 2}, 'val': list(np.array([1.50, 1.55, 1.60]) + gap), 'domains': {},
                'mean_load_cv': cv}
    rows = {'remoe': row('remoe', 0.0, [0.10, 0.12, 0.11]), 'remoe-l1': row('remoe-noaux', 0.01, [0.30, 0.25, 0.40]),
            'topk-noaux': row('topk-noaux', [0.01, 0.0, 0.03])}
    lines = lab_claims.claims(rows)
    assert any(line.startswith("- ReMoE's load-balanced L1 < its plain L1 (ReMoE §5.2, Table 11): **holds**: remoe")
               for line in lines)
    assert any(line.startswith("- ReMoE's plain L1 leaves the experts' load more uneven than its load-balanced L1 "
                               "(ReMoE Fig. 8b-c), the CV of the load: **holds**: remoe-l1 0.317 vs remoe 0.110")
               for line in lines)
    assert any(line.startswith('- ReMoE with the plain L1 < top-k without balancing (ReMoE §5.2, Fig. 8a): **not '
                               'decided') for line in lines)
    rows['remoe']['mean_load_cv'] = None  # a run without load logs: the load claim is left out, the loss one is not
    assert not any('more uneven' in line for line in lab_claims.claims(rows))
    del rows['remoe-l1']
    assert not any('plain L1' in line for line in lab_claims.claims(rows))
