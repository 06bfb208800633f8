"""Text for distillation and evaluation: a bundled English corpus of many text domains (see
corpus/README.md for sources and licenses) with a fixed train / held-out split per domain, plain text
or JSONL files, or Hugging Face dataset ids when the Hub is reachable.

Some bundled domains are *left out*: never in the training text, so their held-out split scores how a
conversion does on English it never saw (`evaluation_sets`)."""

from __future__ import annotations

import gzip
import json
import itertools
import math
import random
import zlib
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

from .errors import CcliError


@dataclass(frozen=True)
class Domain:
    name: str
    file: str  # in ccli/corpus/: text (.txt) or gzip-compressed text (.txt.gz)
    register: str  # what kind of English it holds
    left_out: bool = False  # never in the bundled training text
    heldout_tenths: int = 1  # held-out share of its paragraphs, in tenths


# Sources and licenses: corpus/README.md. News and quips are the registers a conversion trained on the
# first two files alone did worst on, so they are the ones left out: they test generalisation where it
# was weakest. News is small, so half of it is held out (the other half stays out of training too).
DOMAINS = (
    Domain("ccli-prose", "prose.txt", "varied paragraphs written for ccli: reports, stories, letters, explainers"),
    Domain("python-docs", "docstrings.txt", "technical prose from CPython's docstrings"),
    Domain("encyclopedic", "encyclopedic.txt.gz", "dictionary and encyclopedia entries: Jargon File, FOLDOC, Britannica 1911"),
    Domain("fiction", "fiction.txt.gz", "narrative fiction: Jane Austen's novels, Moby Dick"),
    Domain("dialogue", "dialogue.txt.gz", "dialogue: exchanges from Shakespeare's plays, chat-bot conversations"),
    Domain("qa", "qa.txt.gz", "questions with their answers: Debian and Python FAQs, trivia"),
    Domain("instructions", "instructions.txt.gz", "how-to prose: the Python tutorial and HOWTOs, Debian Reference"),
    Domain("technical", "technical.txt.gz", "software manuals: GNU coreutils, findutils, diffutils, grep, gzip"),
    Domain("news", "news.txt.gz", "news and public address: State of the Union speeches, a history of Debian",
           left_out=True, heldout_tenths=5),
    Domain("quips", "quips.txt.gz", "one-liners, quotations and aphorisms: fortune cookies, The Devil's Dictionary",
           left_out=True),
)
SPLITS = ("train", "heldout", "all")


# what 'bundled' trained on before the corpus had domains (a manifest without trained_domains)
TWO_FILE_CORPUS = ("ccli-prose", "python-docs")


def is_bundled(source: str | None) -> bool:
    """Whether `source` names ccli's bundled corpus: None, 'bundled' or 'bundled:NAME[,NAME]'."""
    return source in (None, "bundled") or source.startswith("bundled:")


def domain(name: str) -> Domain:
    for d in DOMAINS:
        if d.name == name:
            return d
    raise CcliError(f"unknown bundled domain '{name}': choose from {', '.join(d.name for d in DOMAINS)}")


def sample_text() -> str:
    """A few paragraphs of varied English used as default profile and bench input, so activation
    statistics come from real text, not random token ids."""
    return _bundled("sample.txt")


def _bundled(name: str) -> str:
    data = resources.files("ccli").joinpath(f"corpus/{name}").read_bytes()
    return (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")


@lru_cache(maxsize=None)
def _domain_paragraphs(name: str) -> tuple[str, ...]:
    return tuple(_paragraphs_from_text(_bundled(domain(name).file)))


def trained_domains(source: str | None) -> list[str]:
    """The bundled domains whose train split `source` trains on: every domain not left out for
    None or 'bundled', the named ones for 'bundled:NAME[,NAME]', none for any other source."""
    if not is_bundled(source):
        return []
    if source in (None, "bundled"):
        return [d.name for d in DOMAINS if not d.left_out]
    names = [n.strip() for n in source[len("bundled:"):].split(",") if n.strip()]
    if not names:
        raise CcliError("--data bundled: needs one or more domain names, e.g. bundled:news,fiction")
    return [domain(n).name for n in dict.fromkeys(names)]


def is_heldout(paragraph: str, tenths: int = 1) -> bool:
    """The fixed split: about `tenths` paragraphs in ten, chosen by a hash of the text, so it does not
    depend on file order and never changes between runs."""
    return zlib.crc32(paragraph.encode("utf-8")) % 10 < tenths


def _split(paragraphs: list[str], split: str, tenths: int = 1) -> list[str]:
    if split not in SPLITS:
        raise CcliError(f"unknown split '{split}': choose one of {', '.join(SPLITS)}")
    if split == "all":
        return paragraphs
    keep_heldout = split == "heldout"
    return [p for p in paragraphs if is_heldout(p, tenths) == keep_heldout]


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

    source: None or 'bundled' (the corpus shipped with ccli, left-out domains excluded),
    'bundled:NAME[,NAME]' (those bundled domains), a .txt file (paragraphs separated by blank lines,
    or one per line), a .jsonl file (a 'text' field per line), or 'hf:NAME[:CONFIG]'.
    """
    if is_bundled(source):
        chosen = [p for name in trained_domains(source)
                  for p in _split(list(_domain_paragraphs(name)), split, domain(name).heldout_tenths)]
        if not chosen:
            raise CcliError(f"--data '{source or 'bundled'}' has no paragraphs in the {split} split")
        return chosen
    if source.startswith("hf:"):
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
    """The train split of `source` with its short spans (`with_short_spans`), in a seeded order that
    mixes every domain into every stretch of the text.

    Distillation calibrates each layer on the first `tokens` tokens of this list, so its order is the
    sample. Each domain is shuffled with its own spans, then the domains are dealt out in turn, one
    paragraph each: any prefix holds every domain about equally, so a large domain cannot crowd the
    others out of a small calibration budget (in corpus order, the first 32k tokens of the old
    two-file corpus were all prose)."""
    rng = random.Random(seed)
    names = trained_domains(source)
    groups = [load_paragraphs(f"bundled:{n}", "train") for n in names] if names else [load_paragraphs(source, "train")]
    dealt: list[list[str]] = []
    for paragraphs in groups:
        text = with_short_spans(paragraphs, short_spans, rng.randrange(2**31))
        rng.shuffle(text)
        dealt.append(text)
    return [p for turn in itertools.zip_longest(*dealt) for p in turn if p is not None]


@dataclass(frozen=True)
class EvalSet:
    """One text domain's held-out paragraphs, scored separately; `seen` when the conversion trained on
    the domain's train split."""

    name: str
    paragraphs: list[str]
    seen: bool


def _spread(paragraphs: list[str], count: int) -> list[str]:
    """`count` paragraphs evenly spaced through `paragraphs` (a domain's file lists its sources one
    after another, so the first `count` would sample one source)."""
    if len(paragraphs) <= count:
        return list(paragraphs)
    return [paragraphs[i * len(paragraphs) // count] for i in range(count)]


def source_name(source: str) -> str:
    """A user's --data as a domain name: the file's stem or the dataset id."""
    return source[3:] if source.startswith("hf:") else Path(source).name


def evaluation_sets(trained_on: str | None, extra: str | None = None, per_domain: int = 128,
                    seen_domains: list[str] | None = None) -> list[EvalSet]:
    """The held-out text a conversion is scored on, one set per domain: every bundled domain's held-out
    split (left-out domains included), then `trained_on` (when it is a user's file or dataset) and
    `extra` (a user's --data at eval time) as domains of their own. At most `per_domain` paragraphs
    each, spread through the split. `seen_domains` overrides the bundled domains counted as trained on
    (a saved conversion records its own: the bundled corpus may have grown since)."""
    seen = set(trained_domains(trained_on) if seen_domains is None else seen_domains)
    sets = [EvalSet(d.name, _spread(load_paragraphs(f"bundled:{d.name}", "heldout"), per_domain), d.name in seen)
            for d in DOMAINS]
    for source in dict.fromkeys(s for s in (trained_on, extra) if not is_bundled(s)):
        name = source_name(source)
        if any(s.name == name for s in sets):
            raise CcliError(f"--data '{source}' has the name of a bundled domain; rename the file")
        sets.append(EvalSet(name, _spread(load_paragraphs(source, "heldout"), per_domain), source == trained_on))
    return sets
