"""
Sample text from a trained checkpoint.

    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=200 --seed=7

One sample is printed as it is generated; several are printed at the end. Tokens/s go to stderr.
generate() keeps a KV cache (KVCache): the prompt runs through the model once, then one position
per token (its docstring says what happens past block_size).
"""

import argparse
import codecs
import sys
import time

import torch
import torch.nn.functional as F

import data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint


class KVCache:
    """Generation's memory: every layer's keys and values of the positions seen so far, so that a new
    token runs one position through the model instead of the whole context. `pos` positions are
    held (the next token's position); GPT.forward advances it. The buffers take the dtype and
    device of the first keys stored: per layer, [B, nh, max_len, hs] each.

    A one-position step has the same shapes at every position, so that torch.compile makes one graph
    of it (and a GPU could replay it as a CUDA graph): its position is a tensor, `at` [1], its keys
    and values are written at that index, and attention reads the whole buffer under `mask`
    [1, max_len], the positions 0..at. Only a prefill (from position 0) has a length of its own."""

    def __init__(self, n_layer, max_len):
        self.n_layer, self.max_len, self.pos = n_layer, max_len, 0
        self.k = self.v = self.at = self.mask = None
        self.moe = {}  # layer -> what an MoE block carries along the sequence (Lory: its segment's sum, weights)

    def append(self, layer, k, v):
        """Store k, v [B, nh, T, hs] of positions pos..pos+T-1 in `layer`; return that layer's keys,
        values and the mask of those a query may see (None: causal from 0). A call of several
        positions must start at 0 (a prefill): the attention that reads them is causal from
        position 0, or a single new position."""
        B, nh, T, hs = k.shape
        assert self.pos == 0 or T == 1, f"{T} positions appended after {self.pos}: prefill from 0, then one at a time"
        if self.k is None:  # a list per layer, not one stacked tensor: no indexing op per step
            self.k = [k.new_zeros(B, nh, self.max_len, hs) for _ in range(self.n_layer)]
            self.v = [k.new_zeros(B, nh, self.max_len, hs) for _ in range(self.n_layer)]
            # row p: the positions a query at p sees; row max_len (a full cache, never read) spares
            # advance() a branch on pos, which torch.compile would guard (a graph for the last step)
            self.causal = torch.ones(self.max_len + 1, self.max_len, dtype=torch.bool, device=k.device).tril()
            self.at = torch.zeros(1, dtype=torch.long, device=k.device)
        if self.pos == 0:  # a prefill: positions 0..T-1, causal
            self.k[layer][:, :, :T] = k
            self.v[layer][:, :, :T] = v
            return self.k[layer][:, :, :T], self.v[layer][:, :, :T], None
        self.k[layer][:, :, self.at] = k  # one position, at a tensor index (an index_put_, which
        self.v[layer][:, :, self.at] = v  # inductor writes in place; index_copy_ would copy the buffer)
        return self.k[layer], self.v[layer], self.mask  # [B, nh, max_len, hs] x 2, [1, max_len]

    def advance(self, T):
        """After a forward of T positions: the next position, as an int and as `at` and `mask`."""
        self.pos += T
        self.at.fill_(self.pos)
        self.mask = self.causal[self.at]  # [1, max_len]


@torch.inference_mode()  # no autograd bookkeeping at all: ~7 % of a one-position step on a CPU
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, n_vocab=None, kv_cache=True,
             refill=None, on_token=None):
    """Extend idx [B, T] by max_new_tokens sampled tokens, in eval mode (sampling is dropless).
    n_vocab: the tokenizer's vocabulary; the ids above it, padding that rounds the embedding up
    to a multiple of 64 (GPT-2's 50257 -> 50304), are never sampled. on_token(idx_next [B, 1])
    is called with every new token as it is sampled.

    kv_cache=True: the prompt (its last block_size tokens) runs through the model once, then
    each step runs only the new token, its keys and values joining a KVCache. When the cache is
    full (block_size positions) it is emptied and refilled by one prefill of the last `refill`
    tokens (default 3/4 of block_size), at positions 0.., so every token is predicted from a crop
    of the context that starts at position 0 as in training, of refill to block_size tokens.
    kv_cache=False: the whole context, cropped to its last block_size tokens, every step (as
    nanoGPT); refill=block_size reproduces it exactly, re-prefilling at every step past block_size."""
    block_size = model.config.block_size
    refill = refill or block_size - block_size // 4
    assert 1 <= refill <= block_size, f"refill={refill} must be between 1 and block_size={block_size}"
    was_training = model.training
    model.eval()  # capacity dropping is for training only
    cache = KVCache(model.config.n_layer, block_size) if kv_cache else None
    for step in range(max_new_tokens):
        if cache is None:
            logits, _, _ = model(idx[:, -block_size:])
        elif step == 0 or cache.pos == block_size:  # the prompt, or a full cache: (re)prefill from 0
            cache.pos = 0
            logits, _, _ = model(idx[:, -(block_size if step == 0 else refill):], cache=cache)
        else:
            logits, _, _ = model(idx[:, -1:], cache=cache)  # one position
        logits = logits[:, -1, :n_vocab or model.config.vocab_size].float()
        if temperature == 0:  # greedy
            idx_next = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits.masked_fill_(logits < v[:, -1:], -float('inf'))
            # torch.multinomial(probs, 1) without its input checks (~2/3 of its time at one token): the
            # same exponential race (argmax of p / q, q ~ Exp(1)), so the same tokens for the same seed
            probs = F.softmax(logits, dim=-1)
            idx_next = (probs / torch.empty_like(probs).exponential_()).argmax(dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
        if on_token is not None:
            on_token(idx_next)
    model.train(was_training)
    return idx


class StreamDecoder:
    """Token ids -> text, a piece at a time; the pieces add up to enc.decode(all the ids). A UTF-8
    character whose bytes are split over tokens (bytes tokens split every non-ASCII one, GPT-2's
    byte-level BPE splits some) is held back until its last byte has come."""

    def __init__(self, enc):
        self.enc = enc
        self.utf8 = codecs.getincrementaldecoder('utf-8')(errors='replace')  # as enc.decode's errors

    def decode(self, ids, final=False):
        if self.enc.name == 'bytes':  # data.ByteTokenizer: bytes, and NUL (the end of a document) as '\n'
            return self.utf8.decode(bytes(ids), final).replace('\0', '\n')
        return self.utf8.decode(self.enc.decode_bytes(ids), final)


def generate_text(model, tokenizer, start, num_samples=1, max_new_tokens=200, temperature=0.8, top_k=200,
                  device='cpu', stream=None):
    """Continue `start` num_samples times; returns the decoded texts, prompt included.
    tokenizer: the one the model was trained with, 'gpt2' or 'bytes'. stream: a text file that a
    single sample (num_samples=1) is written to as it is generated, prompt first."""
    enc = data.get_tokenizer(tokenizer)
    ids = enc.encode(start, allowed_special={'<|endoftext|>'}) or [enc.eot_token]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    decoder = StreamDecoder(enc) if stream is not None and num_samples == 1 else None

    def write(idx_next, final=False):  # one sample's new tokens, as text, to the stream
        stream.write(decoder.decode(idx_next[0].tolist(), final))
        stream.flush()
    on_token = write if decoder else None
    if on_token is not None:
        on_token(idx)  # the prompt
    out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, n_vocab=enc.n_vocab,
                         on_token=on_token)
    if on_token is not None:
        on_token(idx[:, :0], final=True)  # whatever an unfinished character held back
    return [enc.decode(row) for row in out.tolist()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out_dir', default='out', help='folder holding ckpt.pt')
    p.add_argument('--start', default='\n', help='the prompt, or FILE:path to read it from a file')
    p.add_argument('--num_samples', type=int, default=3)
    p.add_argument('--max_new_tokens', type=int, default=200)
    p.add_argument('--temperature', type=float, default=0.8, help='0 = greedy, <1 sharper, >1 more random')
    p.add_argument('--top_k', type=int, default=200, help='sample among the k likeliest tokens (0 = all)')
    p.add_argument('--seed', type=int, default=1337)
    p.add_argument('--device', default='', help="'' = cuda if available, else cpu")
    p.add_argument('--compile', action='store_true',
                   help='torch.compile the model first (three graphs, a minute on a CPU; README: Sampling)')
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    for name in ('num_samples', 'max_new_tokens'):
        if getattr(args, name) < 1:
            die(f"--{name}={getattr(args, name)} must be a positive integer")
    for name, what in (('temperature', '0 = greedy'), ('top_k', '0 = all tokens')):
        if getattr(args, name) < 0:
            die(f"--{name}={getattr(args, name)} must be >= 0 ({what})")
    start = args.start
    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
        except OSError as e:
            die(f"cannot read the prompt file {start[5:]!r} ({e.strerror})")
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    try:  # before the checkpoint: a device this machine lacks is not an unreadable checkpoint
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        why = str(e).splitlines()[0].split('. ')[0][:120]  # torch's first sentence: some run for a page
        die(f"--device={device!r} is not usable on this machine ({why}): use --device=cpu")
    torch.manual_seed(args.seed)
    try:
        ckpt = load_checkpoint(f'{args.out_dir}/ckpt.pt', device)
        model = model_from_checkpoint(ckpt).to(device)
    except (CheckpointError, data.DataError) as e:
        die(str(e))
    if args.compile:
        # the MoE's expert op has a data-dependent intermediate size, which inference must be let to trace
        torch._dynamo.config.capture_dynamic_output_shape_ops = True
        model.compile()  # in place: generate's calls of the model run compiled
    t0 = time.perf_counter()
    # checkpoints from before the byte-level datasets hold no tokenizer: they are all GPT-2 BPE
    texts = generate_text(model, ckpt.get('tokenizer', 'gpt2'), start, args.num_samples, args.max_new_tokens,
                          args.temperature, args.top_k or None, device, stream=sys.stdout)
    seconds = time.perf_counter() - t0
    if args.num_samples == 1:  # already printed as it came
        print()
        print('-' * 40)
    else:
        for text in texts:
            print(text)
            print('-' * 40)
    n = args.num_samples * args.max_new_tokens
    print(f"{n} tokens in {seconds:.2f} s: {n / seconds:,.0f} tokens/s"
          f"{' (compilation included)' if args.compile else ''}", file=sys.stderr)


if __name__ == '__main__':
    main()
