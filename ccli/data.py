"""Text for distillation and evaluation: a bundled English corpus (see corpus/README.md for sources
and licenses) with a fixed train / held-out split, plain text or JSONL files, or Hugging Face
dataset ids when the Hub is reachable."""

from __future__ import annotations

import json
import math
import random
import zlib
from importlib import resources
from pathlib import Path

from .errors import CcliError

BUNDLED = ("prose.txt", "docstrings.txt")
SPLITS = ("train", "heldout", "all")


def sample_text() -> str:
    """A few paragraphs of varied English used as default profile and bench input, so activation
    statistics come from real text, not random token ids."""
    return _bundled("sample.txt")


def _bundled(name: str) -> str:
    return resources.files("ccli").joinpath(f"corpus/{name}").read_text(encoding="utf-8")


def is_heldout(paragraph: str) -> bool:
    """The fixed split: about one paragraph in ten, chosen by a hash of its text."""
    return zlib.crc32(paragraph.encode("utf-8")) % 10 == 0


def _split(paragraphs: list[str], split: str) -> list[str]:
    if split not in SPLITS:
        raise CcliError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    if split == "all":
        return paragraphs
    keep_heldout = split == "heldout"
    return [p for p in paragraphs if is_heldout(p) == keep_heldout]


def _paragraphs_from_text(text: str) -> list[str]:
    """Paragraphs are separated by blank lines; a file with no blank lines has one per line."""
    blocks = [b for b in text.split("\n\n") if b.strip()] if "\n\n" in text else text.splitlines()
    return [" ".join(b.split()) for b in blocks if b.strip()]


def _from_jsonl(path: Path) -> list[str]:
    paragraphs = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CcliError(f"--data '{path}' is not UTF-8 text (JSONL is)") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CcliError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        text = record.get("text") if isinstance(record, dict) else record if isinstance(record, str) else None
        if not isinstance(text, str):
            raise CcliError(f"{path}:{number}: each JSONL line needs a string field 'text'")
        if text.strip():
            paragraphs.append(" ".join(text.split()))
    return paragraphs


def _from_hub_dataset(spec: str) -> list[str]:
    """'hf:NAME[:CONFIG]' -> the dataset's 'text' column (train split) through the datasets library."""
    from .hub import hub_reachable

    name, _, config = spec[3:].partition(":")
    try:
        import datasets
    except ImportError as exc:
        raise CcliError("Hugging Face dataset ids need the datasets package: pip install datasets") from exc
    if not hub_reachable():
        raise CcliError(f"cannot load dataset '{name}': the Hub cannot be reached; pass a .txt or .jsonl file instead")
    dataset = datasets.load_dataset(name, config or None, split="train")
    if "text" not in dataset.column_names:
        raise CcliError(f"dataset '{name}' has no 'text' column (it has {', '.join(dataset.column_names)})")
    return [" ".join(t.split()) for t in dataset["text"] if t and t.strip()]


def load_paragraphs(source: str | None = None, split: str = "train") -> list[str]:
    """Paragraphs of `source` in `split`.

    source: None or 'bundled' (the corpus shipped with ccli), a .txt file (paragraphs separated by
    blank lines, or one per line), a .jsonl file (a 'text' field per line), or 'hf:NAME[:CONFIG]'.
    """
    if source in (None, "bundled"):
        paragraphs = [p for name in BUNDLED for p in _paragraphs_from_text(_bundled(name))]
    elif source.startswith("hf:"):
        paragraphs = _from_hub_dataset(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CcliError(f"--data '{source}': no such file (give a .txt or .jsonl file, 'bundled' or hf:NAME)")
        if path.suffix == ".jsonl":
            paragraphs = _from_jsonl(path)
        else:
            try:
                paragraphs = _paragraphs_from_text(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError as exc:
                raise CcliError(f"--data '{source}' is not UTF-8 text") from exc
    chosen = _split(paragraphs, split)
    if not chosen:
        raise CcliError(f"--data '{source or 'bundled'}' has no paragraphs in the {split} split")
    return chosen


SPAN_WORDS = (4, 64)  # shortest and longest span added by `with_short_spans`


def with_short_spans(paragraphs: list[str], fraction: float, seed: int = 0) -> list[str]:
    """`paragraphs` plus `round(fraction * len(paragraphs))` random spans of 4 to 64 words (log-uniform
    length, so short ones are common) cut from them.

    Distilling on whole paragraphs only leaves a converted model weakest on short inputs, which
    sentence-embedding models mostly see as queries (a converted minilm scored pooled cosine 0.876 on
    4-8 word spans of held-out text against 0.932 on whole paragraphs); the spans put such inputs in the
    training mix. Deterministic for a given seed."""
    if fraction <= 0:
        return list(paragraphs)
    rng = random.Random(seed)
    lo, hi = SPAN_WORDS
    spans = []
    for _ in range(round(fraction * len(paragraphs))):
        words = rng.choice(paragraphs).split()
        n = min(len(words), round(2 ** rng.uniform(math.log2(lo), math.log2(hi))))
        start = rng.randint(0, len(words) - n)
        spans.append(" ".join(words[start : start + n]))
    return list(paragraphs) + spans


def training_text(source: str | None, short_spans: float, seed: int) -> list[str]:
    """The train split of `source` with its short spans (`with_short_spans`), in a seeded random order.

    Distillation calibrates each layer on the first `tokens` tokens of this list, so its order is the
    sample: in corpus order, the bundled corpus's first 32k tokens are all prose (its docstrings come
    after), and the spans come last of all. Shuffled, any prefix samples every source and the spans."""
    text = with_short_spans(load_paragraphs(source, "train"), short_spans, seed)
    random.Random(seed).shuffle(text)
    return text
