"""
Sample text from a trained checkpoint.

    python sample.py --out_dir=out --start="ROMEO:" --num_samples=3 --max_new_tokens=200
    python sample.py --start=FILE:prompt.txt --temperature=0.8 --top_k=200 --seed=7
"""

import argparse
import sys

import torch

import data
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint


def generate_text(model, tokenizer, start, num_samples=1, max_new_tokens=200, temperature=0.8, top_k=200,
                  device='cpu'):
    """Continue `start` num_samples times; returns the decoded texts, prompt included.
    tokenizer: the one the model was trained with, 'gpt2' or 'bytes'."""
    enc = data.get_tokenizer(tokenizer)
    ids = enc.encode(start, allowed_special={'<|endoftext|>'}) or [enc.eot_token]
    idx = torch.tensor([ids] * num_samples, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, n_vocab=enc.n_vocab)
    model.train(was_training)
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
    args = p.parse_args(argv)

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    for name in ('num_samples', 'max_new_tokens'):
        if getattr(args, name) < 1:
            die(f"--{name}={getattr(args, name)} must be a positive integer")
    if args.temperature < 0 or args.top_k < 0:
        die(f"--temperature={args.temperature} and --top_k={args.top_k} must be >= 0")
    start = args.start
    if start.startswith('FILE:'):
        try:
            with open(start[5:], encoding='utf-8') as f:
                start = f.read()
        except OSError as e:
            die(f"cannot read the prompt file {start[5:]!r} ({e.strerror})")
    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    torch.manual_seed(args.seed)
    try:
        ckpt = load_checkpoint(f'{args.out_dir}/ckpt.pt', device)
        model = model_from_checkpoint(ckpt).to(device)
    except (CheckpointError, data.DataError) as e:
        die(str(e))
    # checkpoints from before the byte-level datasets hold no tokenizer: they are all GPT-2 BPE
    texts = generate_text(model, ckpt.get('tokenizer', 'gpt2'), start, args.num_samples, args.max_new_tokens,
                          args.temperature, args.top_k or None, device)
    for text in texts:
        print(text)
        print('-' * 40)


if __name__ == '__main__':
    main()
