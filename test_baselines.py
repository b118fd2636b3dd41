"""
Property tests of the routers the seed papers compare against (baselines.py), one or two each:
what makes each one the router its paper describes.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sample
from baselines import CosineLogits, rmoe_router_params
from model import GPT, GPTConfig

V = 64


def tiny(router, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4, top_k=2, block_size=16,
                                   vocab_size=V, router=router), **overrides}))


def routed_experts(model, idx, **kwargs):
    """The expert of every token in the first MoE layer, from its gates (one non-zero per row)."""
    seen = []
    model.routers()[0].register_forward_hook(lambda mod, args, out: seen.append(out[0].detach()) and None)
    model(idx, **kwargs)
    return seen


@given(ids=st.lists(st.integers(0, V - 1), min_size=1, max_size=16), E=st.sampled_from([2, 4, 8]))
def test_hash_expert_is_the_id_mod_E_with_gate_1(ids, E):
    model = tiny('hash', n_expert=E, top_k=1).eval()
    idx = torch.tensor([ids])
    (gates,) = routed_experts(model, idx)
    assert ((gates > 0).sum(-1) == 1).all() and torch.equal(gates.max(-1).values, torch.ones(len(ids)))
    assert torch.equal(gates.argmax(-1), idx[0] % E)


def test_hash_routes_by_id_at_every_decode_step():
    """Generating with the KV cache: each new token's expert is still its id mod E."""
    model = tiny('hash', top_k=1).eval()
    steps = []
    model.routers()[0].register_forward_hook(lambda mod, args, out: steps.append(out[0].detach()) and None)
    out = sample.generate(model, torch.tensor([[5, 9]]), 6, temperature=0, n_vocab=V)
    decoded = torch.cat([g.argmax(-1) for g in steps])  # the prompt's two, then one per step
    assert torch.equal(decoded, out[0, :decoded.numel()] % 4) and len(steps) == 6


def test_hash_random_table_is_seeded_and_balanced():
    tables = [tiny('hash', top_k=1, hash_table='random', hash_seed=s).routers()[0].table for s in (0, 0, 1)]
    assert torch.equal(tables[0], tables[1]) and not torch.equal(tables[0], tables[2])
    assert torch.bincount(tables[0], minlength=4).tolist() == [V // 4] * 4
    assert list(tiny('hash', top_k=1).routers()[0].parameters()) == []


@pytest.mark.parametrize('bad, needle', [
    (dict(top_k=2), "router='hash' picks one expert per token: use top_k=1"),
    (dict(top_k=1, vocab_size=4, n_expert=8), "router='hash' with a vocabulary of 4 ids cannot feed n_expert=8"),
    (dict(top_k=1, hash_table='bigram'), "hash_table='bigram' is not 'mod' or 'random'"),
    (dict(router='random', recurrent_router=True), "recurrent_router=True with router='random' is invalid"),
])
def test_bad_baseline_configs_are_one_line_errors(bad, needle):
    with pytest.raises(ValueError, match=needle.replace('(', r'\(').replace(')', r'\)')) as e:
        GPTConfig(**{'router': 'hash', **bad}).validate()
    assert '\n' not in str(e.value)


def test_random_router_never_changes_and_is_out_of_the_optimizer():
    model = tiny('random')
    before = [r.w_g.weight.clone() for r in model.routers()]
    opt = model.configure_optimizer(1e-2, 0.1, (0.9, 0.95))
    optimised = {id(p) for group in opt.param_groups for p in group['params']}
    assert not any(id(b) in optimised for b in before) and not list(model.routers()[0].parameters())
    for step in range(3):
        idx = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(step))
        _, loss, info = model(idx, idx)
        loss.backward()
        opt.step(), opt.zero_grad()
        assert info['aux_loss'] > 0  # the Switch loss stays on, as RMoE ran it
    assert all(torch.equal(r.w_g.weight, b) for r, b in zip(model.routers(), before))


@given(N=st.integers(1, 20), D=st.integers(2, 24), E=st.integers(1, 8), dim=st.sampled_from([0, 4, 16]),
       log_tau=st.floats(-6, 1), seed=st.integers(0, 2**16))
def test_cosine_logits_are_bounded_by_one_over_tau(N, D, E, dim, log_tau, seed):
    torch.manual_seed(seed)
    logits = CosineLogits(D, E, dim)
    with torch.no_grad():
        logits.log_tau.fill_(log_tau)
    z = logits(10 * torch.randn(N, D))
    tau = max(torch.tensor(log_tau).exp().item(), CosineLogits.TAU_MIN)
    assert z.shape == (N, E) and (z.abs() <= 1 / tau * (1 + 1e-5)).all()


def test_cosine_and_xmoe_learn_their_temperature_and_compose_with_the_gru():
    for router in ('cosine', 'xmoe'):
        model = tiny(router, recurrent_router=True, rmoe_dim=8, xmoe_dim=4)
        idx = torch.randint(0, V, (2, 16))
        model(idx, idx)[1].backward()
        r = model.routers()[0]
        assert r.gru is not None and r.w_g.log_tau.grad is not None and r.gru.weight_ih.grad is not None


def test_mlp_router_matches_the_recurrent_routers_parameters():
    """router_hidden=0 sizes the MLP as RMoE's router (projector, logits, a layer's share of the GRU)."""
    shape = dict(n_layer=4, n_head=4, n_embd=128, ffn_hidden=0, n_expert=8, top_k=2, vocab_size=256, block_size=32)
    mlp = tiny('mlp', rmoe_dim=64, **shape).routers()[0]  # (rmoe_dim sizes the router it matches)
    rmoe = tiny('topk', recurrent_router=True, rmoe_dim=64, **shape)
    own = sum(p.numel() for p in mlp.parameters())
    gru_share = sum(p.numel() for p in rmoe.routers()[0].gru.parameters()) / 4
    recurrent = sum(p.numel() for n, p in rmoe.routers()[0].named_parameters() if not n.startswith('gru')) + gru_share
    assert recurrent == rmoe_router_params(GPTConfig(**shape, rmoe_dim=64)) == 14944
    assert abs(own - recurrent) / recurrent < 0.01 and mlp.w_g[0].out_features == 110


def test_hyperrouter_generates_one_router_from_a_trainable_embedding():
    model = tiny('hyperrouter', router_hidden=32)
    h = model.routers()[0].w_g
    assert [n for n, _ in h.named_parameters()] == ['embedding']  # the hypernetwork is frozen: buffers
    idx = torch.randint(0, V, (2, 16))
    model(idx, idx)[1].backward()
    assert h.embedding.grad is not None and h.embedding.grad.abs().sum() > 0


# -----------------------------------------------------------------------------
# Expert Choice


@given(B=st.integers(1, 3), T=st.sampled_from([4, 8, 16]), E=st.sampled_from([2, 4]), K=st.integers(1, 2),
       capacity=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**16))
def test_expert_choice_takes_exactly_C_tokens_of_each_sequence_in_training(B, T, E, K, capacity, seed):
    torch.manual_seed(seed)
    C = min(T, int(capacity * T * K / E))
    if C < 1:
        return
    router = tiny('expert_choice', n_expert=E, top_k=K, ec_capacity=capacity, block_size=T).routers()[0]
    x = torch.randn(B * T, 16)
    gates, aux_loss, stats, _ = router(x, seq_len=T)
    per_seq = (gates > 0).view(B, T, E).sum(1)  # [B, E] tokens each expert took in each sequence
    assert (per_seq == C).all() and aux_loss == 0  # (ties at exactly 0 probability do not occur)
    probs = router.w_g(x).softmax(-1)
    torch.testing.assert_close(gates[gates > 0], probs[gates > 0])  # the gate is the chosen score
    assert stats['unrouted'] == ((gates > 0).sum(-1) == 0).float().mean()


def test_expert_choice_evaluates_with_token_choice_unless_asked_for_its_training_rule():
    model = tiny('expert_choice', ec_capacity=1.0)
    router, x = model.routers()[0], torch.randn(32, 16)
    trained = router(x, seq_len=16)[0]
    router.eval()
    causal = router(x, seq_len=16)[0]
    assert ((causal > 0).sum(-1) == 2).all() and not torch.equal(causal, trained)
    router.eval_rule = 'choice'
    torch.testing.assert_close(router(x, seq_len=16)[0], trained)


def test_expert_choice_refuses_a_capacity_that_takes_no_token():
    with pytest.raises(ValueError, match=r'ec_capacity=0.01 gives each expert C = 0'):
        GPTConfig(router='expert_choice', ec_capacity=0.01, block_size=64, n_expert=8, top_k=1).validate()


# -----------------------------------------------------------------------------
# SparseMixer-v2


def sparsemixer(logits, **overrides):
    """A sparsemixer router whose logits are `logits` itself (x = logits, W = identity)."""
    E = logits.size(-1)
    router = tiny('sparsemixer', n_embd=E, n_head=1, n_expert=E, **overrides).routers()[0]
    with torch.no_grad():
        router.w_g.weight.copy_(torch.eye(E))
    return router


def test_sparsemixer_evaluation_is_the_argmax_with_its_masked_softmax_by_hand():
    """z = (2, 1, 0, -10), eps = 0.3: the mask drops z_3 ((2 - 0) / 2 = 1 > 0.6) and z_4, keeps z_2
    ((2 - 1) / 2 = 0.5); p = softmax(2, 1) = (0.7311, 0.2689, 0, 0); the gate of expert 1 is 0.7311,
    its gradient p_1 (onehot(1) - p) = (0.1966, -0.1966, 0, 0)."""
    z = torch.tensor([[2.0, 1.0, 0.0, -10.0]], requires_grad=True)
    router = sparsemixer(z, top_k=1, sparsemixer_eps=0.3).eval()
    gates = router(z)[0]
    torch.testing.assert_close(gates.detach(), torch.tensor([[0.7311, 0.0, 0.0, 0.0]]), atol=1e-4, rtol=0)
    gates[0, 0].backward()
    torch.testing.assert_close(z.grad, torch.tensor([[0.1966, -0.1966, 0.0, 0.0]]), atol=1e-4, rtol=0)


def test_sparsemixer_training_gradient_is_the_heun_estimator():
    """Training: forward c * p_D with c in {1, 1/3} (1/3 only for a sampled non-argmax), backward
    g * p_D * (onehot(D) - p) whatever c (GRIN App. A): checked token by token against that formula."""
    torch.manual_seed(0)
    z = (2 * torch.randn(256, 4)).requires_grad_()
    router = sparsemixer(z, top_k=1, sparsemixer_eps=0.5).train()
    gates, _, stats, _ = router(z)
    g = torch.randn(256, 4)
    (gates * g).sum().backward()
    with torch.no_grad():
        top = z.max(-1, keepdim=True).values
        p = z.masked_fill((top - z) / z.abs().clamp(min=top) > 1.0, float('-inf')).softmax(-1)
        D = gates.argmax(-1, keepdim=True)
        p_d = p.gather(1, D)
        c = gates.gather(1, D) / p_d
        is_max = D == z.argmax(-1, keepdim=True)
        assert torch.allclose(c[is_max], torch.ones(1))  # the argmax is never scaled
        assert ((c - 1).abs() < 1e-5).logical_or((c - 1 / 3).abs() < 1e-5).all()
        assert (~is_max).any() and (c < 0.5).any()  # some samples were not the argmax, some scaled by 1/3
        want = g.gather(1, D) * p_d * (torch.zeros_like(p).scatter(1, D, 1.0) - p)
    torch.testing.assert_close(z.grad, want)
    assert 0 < stats['resampled'] < 1 and 1 / 3 < stats['heun_c'] < 1


def test_sparsemixer_top2_takes_two_experts_without_renormalising():
    z = torch.tensor([[3.0, 2.9, 2.8, -5.0], [3.0, 0.0, -5.0, -5.0]])
    gates = sparsemixer(z, top_k=2, sparsemixer_eps=0.1).eval()(z)[0]
    p1 = torch.tensor([3.0, 2.9, 2.8]).softmax(-1)[0]  # round 1: z_2, z_3 survive the mask, z_4 does not
    p2 = torch.tensor([2.9, 2.8]).softmax(-1)[0]  # round 2: a new mask and softmax over the rest
    torch.testing.assert_close(gates[0], torch.stack([p1, p2, torch.tensor(0.0), torch.tensor(0.0)]))
    # the second token: each round's mask leaves one expert, of weight 1: not renormalised, they sum to 2
    torch.testing.assert_close(gates[1], torch.tensor([1.0, 1.0, 0.0, 0.0]))
