"""
The `web` dataset: a large corpus streamed through Hugging Face `datasets` (imported only here),
tokenized with GPT-2's BPE in batches and written as it goes, for the paper-scale configs.

    python data.py web --max_tokens=100_000_000                    # The Pile (uncopyrighted), from the Hub
    python data.py web --hf_name=json --hf_files='corpus/*.jsonl'  # any `datasets` source, local too

It writes to data/web-<hf_name> (data.dataset_folder) so that different corpora do not overwrite
each other. The first documents (whole ones) go to val, the rest to train.
"""
import glob
import json
import os
import time

import numpy as np

import corpora
from corpora import DataError
from data import _fingerprint, _up_to_date, _write_atomic, dataset_folder, get_encoding


def _web_sources(hf_name, hf_files):
    # local files (hf_files, or hf_name as a folder) enter the fingerprint, so editing one rebuilds
    patterns = [os.path.expanduser(p.strip()) for p in hf_files.split(',') if p.strip()]
    if os.path.isdir(hf_name):
        patterns.append(os.path.join(hf_name, '**', '*'))
    found = {p for pattern in patterns for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)}
    return [corpora.Doc(p, 0, p, None) for p in sorted(found)]  # fingerprinted, never read here


def prepare(data_dir, hf_name, hf_files, hf_split, hf_text_key, max_tokens, val_tokens):
    # Documents are taken in stream order: the first ones go to val until it holds val_tokens
    # (whole documents, so it may hold a little more), the rest to train, and the stream stops at
    # max_tokens in all (val + train; the last train document is cut to fit).
    val_tokens = max(1, min(10_000_000, max_tokens // 100)) if val_tokens is None else val_tokens
    if not 0 < val_tokens < max_tokens:
        raise DataError(f"val_tokens={val_tokens:,} must be above 0 and below max_tokens={max_tokens:,}")
    knobs = dict(hf_name=hf_name, hf_files=hf_files, hf_split=hf_split, hf_text_key=hf_text_key,
                 max_tokens=max_tokens, val_tokens=val_tokens)
    folder = dataset_folder('web', data_dir, hf_name, hf_files)
    fingerprint = _fingerprint(_web_sources(hf_name, hf_files), json.dumps(knobs, sort_keys=True))
    if meta := _up_to_date(folder, fingerprint):
        print(f"{folder} is up to date: {meta['train_tokens']:,} train, {meta['val_tokens']:,} val tokens")
        return folder
    try:
        import datasets  # lazily: only this dataset needs it, and it is a heavy import
    except ImportError:
        raise DataError("dataset='web' needs the datasets package: pip install datasets") from None
    if hf_name in getattr(datasets.packaged_modules, '_PACKAGED_DATASETS_MODULES', ()) and not hf_files:
        # without data_files a builder like 'json' reads every matching file below the cwd
        raise DataError(f"hf_name={hf_name!r} reads local files: pass hf_files=<path or glob>")

    t0, enc = time.time(), get_encoding()
    tmp = {s: os.path.join(folder, f'{s}.bin.{os.getpid()}.tmp') for s in ('train', 'val')}
    tokens, docs, shown = dict(train=0, val=0), dict(train=0, val=0), t0
    files = [p.strip() for p in hf_files.split(',') if p.strip()]
    try:
        stream = datasets.load_dataset(hf_name, split=hf_split, streaming=True,
                                       **({'data_files': files} if files else {}))
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, 'meta.json')):  # as in prepare(): an interrupted run
            os.remove(os.path.join(folder, 'meta.json'))        # is redone next time
        with open(tmp['train'], 'wb', 1 << 20) as train, open(tmp['val'], 'wb', 1 << 20) as val:
            out = dict(train=train, val=val)
            for batch in stream.iter(batch_size=1024):
                if hf_text_key not in batch:
                    raise DataError(f"{hf_name!r} has no column {hf_text_key!r} (it has "
                                    f"{', '.join(batch)}): pass hf_text_key=<column>")
                texts = [t for t in batch[hf_text_key] if t and not t.isspace()]  # blank: no document
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
    except (OSError, ValueError) as e:  # ConnectionError, FileNotFoundError, bad JSON, .zst files
        hint = ("the .zst files need pip install zstandard" if 'zstd' in str(e) else
                "check hf_name and hf_files" if isinstance(e, FileNotFoundError) else
                "the machine needs internet access to the Hugging Face Hub, or pass local files with "
                "hf_files=<path or glob>" if isinstance(e, OSError) else f"is it {hf_name} data?")
        raise DataError(f"could not read {hf_name!r} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:300]}): {hint}") from None
    finally:
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
    meta = dict(dataset='web', tokenizer='gpt2', vocab_size=enc.n_vocab, eot=enc.eot_token,
                split_by='document', fingerprint=fingerprint, source=knobs, train_tokens=tokens['train'],
                val_tokens=tokens['val'], train_ndocs=docs['train'], val_ndocs=docs['val'])
    _write_atomic(os.path.join(folder, 'meta.json'), json.dumps(meta, indent=1).encode())
    print(f"web: train {docs['train']:,} docs, {tokens['train']:,} tokens | val {docs['val']:,} docs, "
          f"{tokens['val']:,} tokens -> {folder} ({time.time() - t0:.1f}s)")
    return folder
