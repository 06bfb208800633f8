"""Tiny random models saved as real checkpoint directories (weights, config and a small WordPiece
tokenizer of the model's own vocabulary), and a small text file, for fast end-to-end runs of the CLI."""

import random
from pathlib import Path

WORDS = "the of and to a in is it that for on with as was by this be are from at or an".split()


def tiny_bert_dir(directory: Path, tokenizer: bool = True) -> Path:
    from transformers import BertTokenizer

    from tiny import tiny

    directory = Path(directory)
    tiny("bert").save_pretrained(directory)
    if tokenizer:
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + list("bcdefghjklmnpqrsuvwxyz0123456789.,;:'()-")
        vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
        vocab = list(dict.fromkeys(vocab))[:100]
        BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(directory)
    return directory


def small_text(path: Path, paragraphs: int = 80) -> Path:
    rng = random.Random(0)
    text = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40))) for _ in range(paragraphs)]
    Path(path).write_text("\n\n".join(text) + "\n")
    return Path(path)


# a conversion as small as it gets: every stage runs, in seconds
TINY = dict(to="fff", params={"depth": 1, "leaf_width": 8}, steps=2, tokens=256, batch_tokens=128,
            heldout_paragraphs=8, show_progress=False)
TINY_ARGS = ["--to", "fff", "--depth", "1", "--leaf-width", "8", "--steps", "2", "--tokens", "256"]


def run(*args):
    """The CLI on these arguments (typer's runner, stdout and stderr apart)."""
    from typer.testing import CliRunner

    from ccli.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(result, message, alone=True):
    """Exit code 2 and one error line; `alone`: nothing else on stderr (no training progress came before)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr
    if alone:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def tiny_workspace(root: Path, **convert_options) -> dict:
    """A tiny BERT with its own tokenizer, a small text and one conversion of it under `root`:
    {"root", "model", "text", "converted"}."""
    from ccli.conversion import convert

    model = tiny_bert_dir(root / "model")
    text = small_text(root / "text.txt")
    converted = root / "converted"
    convert(str(model), data=str(text), out=str(converted), **TINY, **convert_options)
    return {"root": root, "model": model, "text": text, "converted": converted}
