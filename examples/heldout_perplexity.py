"""Perplexity of a causal language model on whole held-out paragraphs of ccli's bundled corpus.

    python examples/heldout_perplexity.py [MODEL] [PARAGRAPHS]     # default: smollm2, all 343

Each paragraph is one sequence (up to 128 tokens, no BOS added), batches of 16 padded on the right;
the negative log-likelihood of every real next token is summed over all paragraphs. This is the
original's figure in docs/decoders.md; `ccli convert` / `ccli eval` report perplexity on the first
halves of the held-out paragraphs instead (the text their other fidelity measures use).
"""

import math
import sys
import time

import torch

from ccli.data import load_paragraphs
from ccli.hub import load

name = sys.argv[1] if len(sys.argv) > 1 else "smollm2"
loaded = load(name)
tokenizer, model = loaded.tokenizer, loaded.model
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
heldout = load_paragraphs(None, "heldout")
heldout = heldout[: int(sys.argv[2])] if len(sys.argv) > 2 else heldout
nll, count, start = 0.0, 0, time.time()
with torch.inference_mode():
    for i in range(0, len(heldout), 16):
        enc = tokenizer(heldout[i : i + 16], truncation=True, max_length=128, padding=True, return_tensors="pt")
        logits = model(**enc).logits[:, :-1].float()
        real = enc["attention_mask"][:, 1:].bool()
        logp = torch.log_softmax(logits, -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        nll -= logp[real].sum().item()
        count += real.sum().item()
print(f"{name}: {len(heldout)} held-out paragraphs, {count} positions, perplexity {math.exp(nll / count):.3f} "
      f"({time.time() - start:.0f} s)")
