"""
The final score (evaluate.score_split): every token of the split once, against a hand-computed
mean; the same whatever the seed; per domain; and (test_distributed.py) pooled over processes.
"""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

import data
import distributed
from evaluate import score_split
from model import GPT, GPTConfig

T = 8  # block_size


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A bytes dataset whose val split (the last 10 % of one file) is no multiple of block_size."""
    tmp = tmp_path_factory.mktemp('tiny')
    (tmp / 'a.txt').write_text('Now is the winter of our discontent made glorious summer. ' * 30)
    data.prepare('textfiles', str(tmp / 'data'), files=str(tmp / 'a.txt'), tokenizer='bytes')
    folder = data.dataset_folder('textfiles', str(tmp / 'data'), tokenizer='bytes')
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4,
                          top_k=2, router='remoe', expert_impl='loop'))
    return folder, model


def hand_scores(model, tokens, domains=None):
    """Each target token j >= 1, predicted inside its own window [s, s + T) with s = T * ((j-1) // T),
    one window at a time at its true length (no padding, no batching): [loss of every target]."""
    model.eval()
    losses = []
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, T):
            x = torch.tensor(tokens[s:s + T][:len(tokens) - 1 - s], dtype=torch.long)[None]
            y = torch.tensor(tokens[s + 1:s + 1 + x.size(1)], dtype=torch.long)[None]
            logits, _, _ = model(x, y)
            losses += F.cross_entropy(logits[0], y[0], reduction='none').tolist()
    model.train()
    return losses


def test_score_is_the_mean_over_every_val_token(tiny):
    folder, model = tiny
    batches = data.Batches(folder, batch_size=3, block_size=T)
    tokens = batches.splits['val'].astype(int).tolist()
    assert (len(tokens) - 1) % T and math.ceil((len(tokens) - 1) / T) % 3  # a short tail window, a short last batch
    expected = hand_scores(model, tokens)
    got = score_split(model, batches, nullcontext(), distributed.Dist(), rows=3)
    assert got['val_tokens'] == len(tokens) - 1 == len(expected)
    assert got['val'] == pytest.approx(sum(expected) / len(expected), rel=1e-5)


def test_score_does_not_depend_on_the_seed_or_the_batch_size(tiny):
    folder, model = tiny
    scores = []
    for seed, batch_size in ((1, 3), (2, 3), (3, 5)):
        torch.manual_seed(seed)
        batches = data.Batches(folder, batch_size=batch_size, block_size=T)
        scores.append(score_split(model, batches, nullcontext(), distributed.Dist(), rows=batch_size)['val'])
    assert scores[0] == scores[1]  # the same checkpoint, the same number
    assert scores[2] == pytest.approx(scores[0], rel=1e-6)  # other padding, the same tokens


def test_score_per_domain(tiny):
    folder, model = tiny
    batches = data.Batches(folder, batch_size=4, block_size=T)
    n = len(batches.splits['val'])
    batches.domains = ['even', 'odd']  # a made-up domain per token: its position's parity
    batches.val_domains = torch.arange(n) % 2
    expected = hand_scores(model, batches.splits['val'].astype(int).tolist())  # target j = position j
    got = score_split(model, batches, nullcontext(), distributed.Dist())
    even, odd = expected[1::2], expected[0::2]  # expected[i] is the loss of target position i + 1
    assert got['val_even'] == pytest.approx(sum(even) / len(even), rel=1e-5)
    assert got['val_odd'] == pytest.approx(sum(odd) / len(odd), rel=1e-5)
    assert math.isclose(got['val'], (sum(even) + sum(odd)) / (n - 1), rel_tol=1e-5)


def test_expert_choice_is_also_scored_with_its_training_rule(tiny):
    """Expert Choice's final score is causal (token choice); score_variants adds the teacher-forced
    score of its training rule, equal to a model built with ec_eval='choice', and puts the rule back."""
    from evaluate import score_variants
    folder = tiny[0]
    batches = data.Batches(folder, batch_size=3, block_size=T)
    scores = {}
    for rule in ('topk', 'choice'):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=T, vocab_size=256, n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4,
                              top_k=1, router='expert_choice', ec_eval=rule))
        scores[rule] = score_split(model, batches, nullcontext(), distributed.Dist())['val'], model
    causal, model = scores['topk']
    variants = score_variants(model, batches, nullcontext(), distributed.Dist())
    assert variants == {'val_loss_teacher_forced': scores['choice'][0]} and variants['val_loss_teacher_forced'] != causal
    assert all(r.eval_rule == 'topk' for r in model.routers())  # put back
    assert score_variants(scores['choice'][1], batches, nullcontext(), distributed.Dist()) == {}  # already the rule
    assert score_variants(tiny[1], batches, nullcontext(), distributed.Dist()) == {}  # ReMoE: none
