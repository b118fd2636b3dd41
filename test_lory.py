"""
Lory (lory.py): the merged FFN is the FFN of the merged weights, segment k is routed from segment
k-1 (the first uniformly), and the inputs that would not fit are refused. Causal evaluation, the KV
cache against the uncached loop and the rest of the contract: test_contract.py, test_sample.py.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from pairs import swiglu
from model import GPT, GPTConfig


def lory(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=8, ffn_hidden=6, n_expert=3, top_k=1, block_size=16,
                                   vocab_size=32, router='lory', lory_segment=4), **overrides}))


@given(B=st.integers(1, 3), G=st.integers(1, 3), S=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_the_merged_ffn_is_one_swiglu_of_the_weighted_weights(B, G, S, seed):
    torch.manual_seed(seed)
    moe = lory().transformer.h[0].mlp
    x = torch.randn(B, G, S, 8)
    e = torch.randn(B, G, 3).softmax(-1)
    y = moe.merged_ffn(x, e)
    for b in range(B):
        for g in range(G):  # the weights built by hand, one segment at a time
            w_in = sum(e[b, g, i] * moe.experts.w_in[i] for i in range(3))  # [D, 2H]
            w_out = sum(e[b, g, i] * moe.experts.w_out[i] for i in range(3))  # [H, D]
            torch.testing.assert_close(y[b, g], swiglu(x[b, g] @ w_in) @ w_out, rtol=1e-5, atol=1e-6)


def test_segment_k_is_routed_from_the_mean_of_segment_k_minus_1_and_the_first_uniformly():
    router = lory().routers()[0]
    x = torch.randn(2 * 10, 8)  # two sequences of 10 tokens: segments of 4, 4 and a partial 2
    gates = router(x, seq_len=10)[0].view(2, 10, 3)
    torch.testing.assert_close(gates[:, :4], torch.full((2, 4, 3), 1 / 3))
    seq = x.view(2, 10, 8)
    for k, (lo, hi) in enumerate([(4, 8), (8, 10)], start=1):
        want = router.w_g(seq[:, (k - 1) * 4:k * 4].mean(1)).softmax(-1)  # [2, 3]
        torch.testing.assert_close(gates[:, lo:hi], want[:, None].expand(2, hi - lo, 3))


def test_the_first_segment_sees_no_later_token():
    """The paper routes segment 1 on its own mean (a forward leak); here it is uniform: a change at
    position 3 leaves positions 0-2 alone in every layer."""
    model = lory().eval()
    idx = torch.randint(0, 32, (1, 16))
    later = idx.clone()
    later[0, 3] = (idx[0, 3] + 1) % 32
    with torch.no_grad():
        a, b = model(idx, idx)[0], model(later, later)[0]
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)


@pytest.mark.parametrize('bad, needle', [
    (dict(lory_segment=5), 'lory_segment=5 must be a positive divisor of block_size=16'),
    (dict(top_k=2), "router='lory' runs one merged FFN a token: use top_k=1"),
    (dict(n_shared_expert=1), "n_shared_expert=1 with router='lory' is not supported"),
])
def test_bad_lory_configs_are_one_line_errors(bad, needle):
    with pytest.raises(ValueError, match=needle) as e:
        GPTConfig(**{**dict(router='lory', top_k=1, block_size=16), **bad}).validate()
    assert '\n' not in str(e.value)


def test_the_default_segment_is_a_quarter_of_block_size():
    assert lory(lory_segment=0).transformer.h[0].mlp.segment == 4  # ReMoE: 256 of 1,024
