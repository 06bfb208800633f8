"""Decode ms/token of MoD decoders with and without the direct one-token path
(`MoDBlock.one_token_forward`), beside their dense base model, in interleaved rounds.

    python examples/mod_decode_paths.py DIR [DIR ...] [--rounds 7] [--threads 2] [--prompt 32] [--new 24]

Each round times, in turn: the base model, then each converted directory through its direct
one-token path and through the general routed path (`MoDBlock.causal_forward`); the table gives each
row's median over rounds and its speed against dense. Batch 1, greedy, with the KV cache.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

import ccli
from ccli.api import load
from ccli.variants.mod import MoDBlock
from ccli.variants.mod_causal import bind_call


def general_forward(self, hidden_states, *args, **kwargs):
    return self.causal_forward(hidden_states, bind_call(self, hidden_states, args, kwargs))


def decode_ms(model, ids, new_tokens):
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / new_tokens * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", help="directories written by ccli convert --to mod, one base model")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens (of the bundled sample text)")
    parser.add_argument("--new", type=int, default=24, help="decode steps timed per run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    converted = {d.rstrip("/").split("/")[-1]: load(d) for d in args.dirs}
    first = next(iter(converted.values()))
    base = load(first.manifest["base_source"])
    text = (Path(ccli.__file__).parent / "corpus" / "sample.txt").read_text()
    ids = base.tokenizer(text, return_tensors="pt", truncation=True, max_length=args.prompt)["input_ids"]
    direct = MoDBlock.forward
    times: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            times.setdefault("dense", []).append(decode_ms(base.model, ids, args.new))
            for name, loaded in converted.items():
                for path, forward in (("direct", direct), ("general", general_forward)):
                    MoDBlock.forward = forward
                    times.setdefault(f"{name} ({path})", []).append(decode_ms(loaded.model, ids, args.new))
    finally:
        MoDBlock.forward = direct
    dense = statistics.median(times["dense"])
    print(f"decode ms/token, batch 1, prompt {ids.shape[1]}, {args.new} new tokens, {args.threads} threads, "
          f"median of {args.rounds} interleaved rounds")
    for row, values in times.items():
        median = statistics.median(values)
        print(f"{row:40s} {median:8.2f}  x dense {dense / median:.2f}")


if __name__ == "__main__":
    main()
