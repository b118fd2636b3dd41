"""Tests for the web dataset (corpora.web, data.py): a local JSON-lines file through `datasets`, the
same code path as the Hub without the network: split by document, idempotent, token budget,
errors, folder names, the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data import DataError, dataset_folder, get_encoding, load_meta, load_split, prepare


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    pytest.importorskip('datasets')  # a safety net only: requirements.txt installs it, so CI runs these
    docs = [f"Document {i}: " + " ".join(f"word{(i * 7 + j) % 100}" for j in range(i % 40 + 1)) + "\n"
            for i in range(300)]
    path = tmp_path_factory.mktemp("web") / 'corpus.jsonl'
    lines = [json.dumps({'text': d, 'id': i}) for i, d in enumerate(docs)]
    lines.insert(5, json.dumps({'text': "  \n", 'id': -1}))  # blank: not a document
    path.write_text("\n".join(lines) + "\n")
    return path, docs


def _web(data_dir, path, **kw):
    return prepare('web', str(data_dir), hf_name='json', hf_files=str(path), **kw)


def test_web_split_by_document_and_idempotent(tmp_path, corpus):
    path, docs = corpus
    enc = get_encoding()
    lengths = [len(enc.encode_ordinary(d)) + 1 for d in docs]  # + EOT
    n_val = next(k for k in range(1, 300) if sum(lengths[:k]) >= 500)  # first docs until 500 tokens
    folder = _web(tmp_path, path, val_tokens=500)
    assert folder == dataset_folder('web', str(tmp_path), 'json', str(path)) == str(tmp_path / 'web-json-corpus.jsonl')
    meta = load_meta(folder)
    assert meta['split_by'] == 'document' and meta['source']['val_tokens'] == 500
    assert (meta['val_ndocs'], meta['train_ndocs']) == (n_val, 300 - n_val)
    assert (meta['val_tokens'], meta['train_tokens']) == (sum(lengths[:n_val]), sum(lengths[n_val:]))
    val, train = load_split(folder, 'val'), load_split(folder, 'train')
    assert ((val == enc.eot_token).sum(), (train == enc.eot_token).sum()) == (n_val, 300 - n_val)
    assert enc.decode(val.tolist()) == "".join(d + "<|endoftext|>" for d in docs[:n_val])
    assert enc.decode(train.tolist()) == "".join(d + "<|endoftext|>" for d in docs[n_val:])
    assert sorted(os.listdir(folder)) == ['meta.json', 'train.bin', 'val.bin']  # no temp files left

    files = [os.path.join(folder, f) for f in ('train.bin', 'val.bin', 'meta.json')]
    before = [os.stat(f).st_mtime_ns for f in files]
    assert _web(tmp_path, path, val_tokens=500) == folder
    assert [os.stat(f).st_mtime_ns for f in files] == before  # up to date: nothing rewritten
    _web(tmp_path, path, val_tokens=50)  # any knob enters the fingerprint
    assert load_meta(folder)['val_ndocs'] < n_val


def test_web_max_tokens(tmp_path, corpus):
    path, _ = corpus
    full = _web(tmp_path / 'full', path, val_tokens=100)
    cut = _web(tmp_path / 'cut', path, val_tokens=100, max_tokens=1000)
    meta = load_meta(cut)
    assert meta['val_tokens'] + meta['train_tokens'] == 1000  # the last train document is cut to fit
    assert np.array_equal(load_split(cut, 'val'), load_split(full, 'val'))
    assert np.array_equal(load_split(cut, 'train'), load_split(full, 'train')[:meta['train_tokens']])
    # the default val split: 1% of max_tokens (at most 10M), in whole documents
    meta = load_meta(_web(tmp_path / 'default', path, max_tokens=5000))
    assert meta['source']['val_tokens'] == 50 and 50 <= meta['val_tokens'] < 50 + 60  # docs < 60 tokens


def test_web_errors(tmp_path, corpus, monkeypatch):
    path, _ = corpus
    with pytest.raises(DataError, match=r"hf_name='json' reads local files: pass hf_files="):
        prepare('web', str(tmp_path), hf_name='json')  # would otherwise read every json below the cwd
    with pytest.raises(DataError, match=r"has no column 'body' \(it has text, id\): pass hf_text_key="):
        _web(tmp_path, path, hf_text_key='body')
    with pytest.raises(DataError, match=r"val_tokens=1,000 must be above 0 and below max_tokens=1,000"):
        _web(tmp_path, path, val_tokens=1000, max_tokens=1000)
    with pytest.raises(DataError, match=r"ran out after [0-9,]+ tokens, all in val"):
        _web(tmp_path, path, val_tokens=10**7)
    with pytest.raises(DataError, match=r"FileNotFoundError.*check hf_name and hf_files"):
        _web(tmp_path, tmp_path / 'nope.jsonl')

    import datasets
    def offline(*args, **kwargs):  # what load_dataset raises for a Hub dataset with no network
        raise ConnectionError("Couldn't reach 'monology/pile-uncopyrighted' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(datasets, 'load_dataset', offline)
    with pytest.raises(DataError) as e:
        prepare('web', str(tmp_path))
    assert "\n" not in str(e.value) and "needs internet access to the Hugging Face Hub" in str(e.value)
    assert "hf_files=" in str(e.value) and not os.path.exists(tmp_path / 'web-monology-pile-uncopyrighted')


def test_web_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'datasets', None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"^dataset='web' needs the datasets package: pip install datasets$"):
        prepare('web', str(tmp_path))


def test_web_folder_names():
    assert dataset_folder('shakespeare') == os.path.join('data', 'shakespeare')
    assert dataset_folder('web') == os.path.join('data', 'web-monology-pile-uncopyrighted')
    assert dataset_folder('web', 'd', '/srv/my corpus/') == os.path.join('d', 'web-srv-my-corpus')
    assert dataset_folder('web', 'd', 'text', 'a/b/*.txt,c.txt') == os.path.join('d', 'web-text-.txt')


def test_web_cli(tmp_path, corpus):
    path, _ = corpus
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, 'data.py'), 'web', '--hf_name=json',
                        f'--hf_files={path}', '--max_tokens=2000', '--val_tokens=100', '--data_dir=d'],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    meta = load_meta(tmp_path / 'd' / 'web-json-corpus.jsonl')
    assert meta['train_tokens'] + meta['val_tokens'] == 2000 and meta['source']['hf_files'] == str(path)
