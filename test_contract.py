"""
The contract test: every registered router (routers.ROUTERS, baselines.py's included) through the
same checks. The whole model compiled with fullgraph against eager (test_experts), KV-cache
generation against the uncached loop (test_sample) and 2 gloo processes against one for every
batch-independent router (test_distributed) run over the same registry; here: the rest.
"""
import pytest
import torch
import torch.nn as nn

import configurator
from conftest import router_config
from model import GPT, ROUTERS, GPTConfig
from routers import LOGGED, NOT_LOGGED, Router, router_options

V, T = 64, 12


def tiny(router, seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**router_config(router, **{**dict(
        n_layer=2, n_head=2, n_embd=16, ffn_hidden=16, n_expert=4, top_k=2, block_size=T, vocab_size=V,
        rmoe_dim=8), **overrides})))


def batch(seed=1, B=3):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize('router', ROUTERS)
def test_gates_shapes_losses_and_every_statistic_logged(router):
    model = tiny(router)
    cls = ROUTERS[router]
    E = model.config.moe_shape()[0]
    seen = {}
    def hook(module, args, out):
        seen['gates'] = out[0].detach()
    model.routers()[0].register_forward_hook(hook)
    idx = batch()
    _, loss, info = model(idx, idx)
    gates = seen['gates']
    assert gates.shape == (idx.numel(), E) and (gates >= 0).all() and torch.isfinite(loss)
    stats = set(info) - set(NOT_LOGGED)
    assert stats <= set(cls.stats), f"{router} returns statistics its class does not list: {stats - set(cls.stats)}"
    assert set(cls.stats) <= set(LOGGED), f"statistics the log does not know: {set(cls.stats) - set(LOGGED)}"
    record = model.routing_log(info)  # raises on a statistic the log does not know
    assert len(record['load_cv']) == model.config.n_moe_layers()
    assert isinstance(model.routers()[0].console(record), str)
    loss.backward()
    router_params = [p for r in model.routers() for p in r.parameters()]
    assert bool(router_params) == cls.learned  # a router without parameters makes none (DDP: none unused)
    assert all(p.grad is not None for p in router_params), 'a learned router gets a gradient'


@pytest.mark.parametrize('router', ROUTERS)
def test_evaluation_is_causal(router):
    """Changing the tokens after position t leaves the logits up to t unchanged, for every router."""
    model = tiny(router).eval()
    idx = batch()
    t = T // 2
    later = idx.clone()
    later[:, t + 1:] = (idx[:, t + 1:] + 1 + torch.arange(T - t - 1)) % V
    with torch.no_grad():
        a, _, _ = model(idx, idx)
        b, _, _ = model(later, later)
    torch.testing.assert_close(b[:, :t + 1], a[:, :t + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('router', ROUTERS)
def test_state_dict_round_trip_and_bf16_cast(router):
    model, other = tiny(router, seed=0).eval(), tiny(router, seed=1).eval()  # (eval: SparseMixer samples in training)
    other.load_state_dict(model.state_dict())
    idx = batch()
    with torch.no_grad():
        torch.testing.assert_close(other(idx, idx)[1], model(idx, idx)[1], rtol=0, atol=0)
    model.to(torch.bfloat16)
    for r in model.routers():  # a router's own online state (λ, the bias, the EMA) stays fp32
        assert all(b.dtype == torch.float32 for b in r._buffers.values() if b is not None and b.is_floating_point())
    with torch.no_grad():
        logits, loss, _ = model(idx, idx)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


@pytest.mark.parametrize('router', ROUTERS)
def test_an_option_of_another_router_is_refused(router):
    """Every router option that this router does not read is named as having no effect."""
    c = dict(moe_every=1, router=router, dataset='shakespeare_char')
    ignored = configurator.ignored_options(c)
    for key in router_options():
        if key not in ROUTERS[router].options:
            assert ignored[key] == f"with router={router!r}", key


def test_every_router_is_one_registered_class():
    for name, cls in ROUTERS.items():
        assert issubclass(cls, Router) and cls.name == name and cls.__doc__
        assert set(cls.options) <= {f for f in GPTConfig.__dataclass_fields__}, name
        kind = cls.kind(dict(moe_every=1, router=name))
        assert kind[0] == name, kind
