"""
Generation with the KV cache (sample.KVCache, sample.generate) against the uncached loop that runs the
whole context every step: the same logits at every step for every router, up to block_size, and
past it the documented refill (every logit that of an uncached forward on the crop the cache
holds), and compiled, from three graphs. Then sample.py: padding ids never sampled, streamed text
equal to the decoded text.
Tiny models, weights at a large init (0.15) so that attention and routing are far from uniform;
fp32 at a tolerance of 2e-5 (the cached and uncached paths differ by ~1e-6 at this init).
"""
import io
import random
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import data
import model
import sample
from conftest import router_config
from model import GPT, GPTConfig
from sample import KVCache

BLOCK, VOCAB, N_VOCAB = 16, 64, 60  # ids 60..63 stand for the padding of a rounded-up vocabulary

ROUTERS = {  # every registered router, and RMoE, shared experts and a dense model
    **{name: router_config(name) for name in model.ROUTERS},
    'recurrent': dict(recurrent_router=True, rmoe_dim=16),  # RMoE
    'shared': dict(n_shared_expert=1),
    'dense': dict(moe_every=0),
}


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    config = GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, ffn_hidden=32, n_expert=4, top_k=2,
                                 block_size=BLOCK, vocab_size=VOCAB, init_std=0.15), **overrides})
    return GPT(config).eval()


def step_logits(model, prompt, n, **kwargs):
    """generate()'s tokens and the logits [B, V] each of its n steps saw (from the output head)."""
    seen = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out[:, -1].clone()))
    try:
        out = sample.generate(model, prompt, n, temperature=0, n_vocab=N_VOCAB, **kwargs)
    finally:
        hook.remove()
    assert len(seen) == n
    return out, seen


def assert_same_steps(got, want):
    for step, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5, msg=lambda m: f"step {step}: {m}")


@pytest.mark.parametrize('router', ROUTERS)
def test_cached_logits_and_tokens_match_uncached_up_to_block_size(router):
    model = tiny(**ROUTERS[router])
    prompt = torch.randint(0, N_VOCAB, (3, 5))
    n = BLOCK - prompt.size(1) + 1  # the last step sees exactly block_size positions
    cached, cached_logits = step_logits(model, prompt, n)
    uncached, uncached_logits = step_logits(model, prompt, n, kv_cache=False)
    assert_same_steps(cached_logits, uncached_logits)
    assert torch.equal(cached, uncached)  # greedy

    def draw(kv_cache):  # and sampled, with the same seed
        torch.manual_seed(7)
        return sample.generate(model, prompt, n, temperature=1.0, top_k=20, n_vocab=N_VOCAB, kv_cache=kv_cache)
    assert torch.equal(draw(True), draw(False))


@pytest.mark.parametrize('router', ROUTERS)
def test_past_block_size_refill_block_size_is_the_uncached_cropping(router):
    """refill=block_size re-prefills the last block_size tokens at every step past the window:
    exactly the uncached loop, which crops the context to its last block_size tokens."""
    model = tiny(**ROUTERS[router])
    prompt = torch.randint(0, N_VOCAB, (2, 5))
    n = BLOCK + 3  # 7 steps past block_size
    cached, cached_logits = step_logits(model, prompt, n, refill=BLOCK)
    uncached, uncached_logits = step_logits(model, prompt, n, kv_cache=False)
    assert_same_steps(cached_logits, uncached_logits)
    assert torch.equal(cached, uncached)


def crops(prompt_len, n, refill):
    """The documented context length of each step: the prompt (at most block_size), then one more a
    step; a full cache is refilled with the last `refill` tokens."""
    lengths, held = [], min(prompt_len, BLOCK)
    for step in range(n):
        if step > 0:
            held = refill if held == BLOCK else held + 1
        lengths.append(held)
    return lengths


@pytest.mark.parametrize('router, prompt_len, refill', [(router, 3, None) for router in ROUTERS] + [
    ('topk', BLOCK + 4, None), ('recurrent', BLOCK + 4, None), ('topk', 3, 5), ('recurrent', 3, 5)])
def test_past_block_size_each_step_is_an_uncached_forward_on_the_cached_crop(router, prompt_len, refill):
    """The default (refill = 3/4 of block_size): each step's logits are those of the uncached model
    on the last L tokens, L the crop the cache holds, which differs from the uncached loop's."""
    model = tiny(**ROUTERS[router])
    prompt = torch.randint(0, N_VOCAB, (2, prompt_len))
    n = BLOCK + 8  # two refills of 12 (one of 5)
    out, logits = step_logits(model, prompt, n, refill=refill)
    lengths = crops(prompt_len, n, refill or BLOCK - BLOCK // 4)
    assert max(lengths) == BLOCK and lengths.count(refill or 12) >= (1 if refill else 2)  # refilled
    with torch.no_grad():
        want = [model(out[:, :prompt_len + step][:, -length:])[0][:, -1] for step, length in enumerate(lengths)]
    assert_same_steps(logits, want)
    assert torch.equal(out[:, prompt_len:], torch.stack([w[:, :N_VOCAB].argmax(-1) for w in want], 1))
    _, uncached_logits = step_logits(model, prompt, n, kv_cache=False)
    shorter = [step for step, length in enumerate(lengths) if length < min(prompt_len + step, BLOCK)]
    assert shorter and not torch.allclose(logits[shorter[0]], uncached_logits[shorter[0]], atol=1e-4)


def test_cache_prefill_then_single_positions_match_full_forwards():
    """The cache driven by hand: a prefill and one position at a time give every position's logits
    of a full forward; a prefill that does not start at 0 is refused."""
    model = tiny(recurrent_router=True, rmoe_dim=16)
    idx = torch.randint(0, N_VOCAB, (2, BLOCK))
    cache = KVCache(model.config.n_layer, BLOCK)
    with torch.no_grad():
        first = model(idx[:, :6], cache=cache)[0]
        steps = [first] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(6, BLOCK)]
        assert cache.pos == BLOCK
        for t, logits in enumerate(steps, start=5):
            torch.testing.assert_close(logits, model(idx[:, :t + 1])[0], rtol=1e-5, atol=1e-5)
        cache.pos = 3
        with pytest.raises(AssertionError, match='prefill from 0'):
            model(idx[:, :2], cache=cache)
        cache.pos = BLOCK
        with pytest.raises(AssertionError, match='block_size'):
            model(idx[:, :1], cache=cache)


def test_compiled_cache_steps_match_eager_with_one_graph_for_every_step():
    """sample.py --compile: the compiled model driven through the cache as generate drives it (a
    prompt, one position at a time to a full cache, a refill, more steps) gives the eager uncached
    logits at every step, from three graphs (prompt, step, refill) whatever the position and the
    gates: ReMoE's varying number of active experts runs inside one op (moe::decode_ffn)."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    model = tiny(router='remoe')
    compiled = tiny(router='remoe')
    compiled.compile()
    idx = torch.randint(0, N_VOCAB, (1, BLOCK + 4))
    cache, refill = KVCache(model.config.n_layer, BLOCK), 10
    with torch.inference_mode(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        got = {t: compiled(idx[:, t:t + 1] if t > 2 else idx[:, :3], cache=cache)[0] for t in range(2, BLOCK)}
        assert cache.pos == BLOCK
        cache.pos = 0  # full: refill with the last `refill` tokens, from position 0, as generate does
        start = BLOCK - refill
        got_refill = {t: compiled(idx[:, start:t + 1] if t == BLOCK - 1 else idx[:, t:t + 1], cache=cache)[0]
                      for t in range(BLOCK - 1, BLOCK + 4)}
        for t, logits in got.items():
            torch.testing.assert_close(logits, model(idx[:, :t + 1])[0], rtol=1e-4, atol=1e-4)
        for t, logits in got_refill.items():
            torch.testing.assert_close(logits, model(idx[:, start:t + 1])[0], rtol=1e-4, atol=1e-4)
    assert counters['stats']['unique_graphs'] == 3, dict(counters['stats'])
    assert not counters['graph_break'], dict(counters['graph_break'])


def test_generate_is_dropless_and_restores_training_mode():
    """Capacity dropping is for training: generate in a model left in train mode runs in eval mode
    (its logits those of the eval-mode uncached loop) and hands the model back in train mode."""
    model = tiny(capacity_factor=0.5)
    prompt = torch.randint(0, N_VOCAB, (4, 6))
    with torch.no_grad():
        assert not torch.allclose(model.train()(prompt)[0], model.eval()(prompt)[0])  # drops do change it
    _, want = step_logits(model.eval(), prompt, 8, kv_cache=False)
    model.train()
    _, got = step_logits(model, prompt, 8)
    assert model.training
    assert_same_steps(got, want)


def test_generate_text_never_samples_padding_ids_and_streams_the_returned_text():
    """A bytes model whose vocabulary is padded to 320 ids, the padding made the likeliest: the
    text still decodes (an id of 256 or more would not be a byte), and the streamed text of one
    sample is the text returned."""
    model = tiny(vocab_size=320, init_std=0.02)
    D = model.config.n_embd
    head = torch.zeros(320, D)
    head[:256] = model.lm_head.weight[:256]
    head[256:256 + D], head[256 + D:256 + 2 * D] = 50 * torch.eye(D), -50 * torch.eye(D)
    model.lm_head.weight = torch.nn.Parameter(head)  # untied: a padding id wins whatever the hidden state
    assert sample.generate(model, torch.ones(1, 1, dtype=torch.long), 5).max().item() >= 256  # without n_vocab, padding
    for kv_cache in (True, False):
        torch.manual_seed(1)
        out = sample.generate(model, torch.ones(2, 1, dtype=torch.long), 40, n_vocab=256, kv_cache=kv_cache)
        assert out.max().item() < 256
    stream = io.StringIO()
    text, = sample.generate_text(model, 'bytes', 'Née', num_samples=1, max_new_tokens=2 * BLOCK + 5,
                                 temperature=1.0, top_k=None, stream=stream)
    assert stream.getvalue() == text and text.startswith('Née')
    several = sample.generate_text(model, 'bytes', 'x', num_samples=2, max_new_tokens=5, stream=stream)
    assert len(several) == 2 and stream.getvalue() == text  # several samples are not streamed


def pieces(enc, ids, cuts):
    decoder = sample.StreamDecoder(enc)
    bounds = [0, *sorted(cuts), len(ids)]
    return ''.join(decoder.decode(ids[a:b]) for a, b in zip(bounds, bounds[1:])) + decoder.decode([], final=True)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 255), max_size=40), seed=st.integers(0, 2**16))
def test_streamed_bytes_decode_as_a_whole(ids, seed):
    """Any byte sequence (split UTF-8 characters, invalid bytes, NULs), cut anywhere, token by token
    or in pieces: the pieces add up to ByteTokenizer.decode of the whole."""
    enc = data.get_tokenizer('bytes')
    cuts = random.Random(seed).sample(range(len(ids) + 1), k=min(len(ids), 5))
    assert pieces(enc, ids, cuts) == enc.decode(ids)
    assert pieces(enc, ids, range(len(ids) + 1)) == enc.decode(ids)


def test_streamed_gpt2_decode_as_a_whole():
    """GPT-2 BPE, token by token: characters whose bytes span tokens (emoji, CJK) and random ids
    (invalid UTF-8 when cut out of context) come out as tiktoken decodes the whole."""
    enc = data.get_tokenizer('gpt2')
    rng = random.Random(0)
    for ids in (enc.encode('Héllo wörld 🤖🦀 日本語のテキスト <|endoftext|> end', allowed_special='all'),
                [rng.randrange(enc.n_vocab) for _ in range(300)]):
        assert pieces(enc, ids, range(len(ids) + 1)) == enc.decode(ids)


def test_sample_main_streams_one_sample_and_reports_tokens_per_second(tmp_path, capsys):
    model = tiny(vocab_size=256)
    torch.save({'model': model.state_dict(), 'model_args': asdict(model.config), 'tokenizer': 'bytes'},
               tmp_path / 'ckpt.pt')
    args = [f'--out_dir={tmp_path}', '--start=ROMEO:', '--max_new_tokens=40', '--seed=3']
    sample.main([*args, '--num_samples=1'])
    one = capsys.readouterr()
    assert one.out.startswith('ROMEO:') and one.out.endswith('\n' + '-' * 40 + '\n')
    assert one.err.startswith('40 tokens in ') and 'tokens/s' in one.err
    torch.manual_seed(3)  # as main: the seed, then the model (whose init draws), then the sample
    again = GPT(model.config)
    again.load_state_dict(model.state_dict())
    text, = sample.generate_text(again, 'bytes', 'ROMEO:', max_new_tokens=40)
    assert one.out == text + '\n' + '-' * 40 + '\n'  # streaming prints what the texts would have printed
    sample.main([*args, '--num_samples=2'])
    two = capsys.readouterr()
    assert two.out.count('ROMEO:') == 2 and two.out.count('-' * 40) == 2 and '80 tokens in ' in two.err
