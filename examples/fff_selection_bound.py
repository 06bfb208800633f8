"""How well can ANY choice of neurons per token do at a given FFN budget? (the top-k bound in docs/experiments.md)

    python examples/fff_selection_bound.py [K] [E2E_STEPS]      (defaults: 382 1200; ~40 min on 1 thread)

Every FFN of the embedded default model keeps, for each token, its own K dense neurons that move the
output most (|activation| x |output column|, chosen among all of them and recomputed on every forward
pass); the others are dropped. The model is then trained end to end exactly as `ccli convert` does
(same engine, data, short spans and learning rate as recipes/fff-minilm.yaml) and scored on the
held-out text. Choosing the neurons needs every pre-activation, so this is no speedup: it measures how
much fidelity a router that picked each token's neurons perfectly could keep, for comparison with
what a tree's leaves (fixed neuron subsets) keep at the same number of neurons per token.
"""

import copy
import sys

import torch
from torch import nn

from ccli.arch import view
from ccli.data import load_paragraphs, training_text
from ccli.distill import DistillConfig, end_to_end, tokenize
from ccli.hub import load
from ccli.measure.fidelity import compare
from ccli.progress import Progress
from ccli.variants.base import ConvertedModule, DenseFFN, apply_activation


class TopKFFN(ConvertedModule):
    """A dense FFN that keeps only each token's top-k contributing neurons (trainable)."""

    unit_kind = "ffn"  # the distillation engine trains every ConvertedModule

    def __init__(self, dense: DenseFFN, k: int):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(dense.w_in.clone()), nn.Parameter(dense.w_out.clone())
        self.b_in, self.b_out = nn.Parameter(dense.b_in.clone()), nn.Parameter(dense.b_out.clone())
        self.activation, self.k = dense.activation, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = apply_activation(nn.functional.linear(x, self.w_in, self.b_in), self.activation)
        contribution = a.detach().abs() * self.w_out.detach().norm(dim=0)
        keep = torch.zeros_like(a).scatter_(-1, contribution.topk(self.k, dim=-1).indices, 1.0)
        return nn.functional.linear(a * keep, self.w_out, self.b_out)


def main(k: int = 382, e2e_steps: int = 1200) -> None:
    torch.manual_seed(0)
    teacher = load("minilm")
    student = copy.deepcopy(teacher.model)
    for block in view(student).blocks:
        block.ffn.replace(TopKFFN(DenseFFN.from_view(block.ffn), k))
    heldout = load_paragraphs(None, "heldout")[:256]
    keys = ("embedding_cosine", "embedding_cosine_min", "embedding_cosine_short", "retrieval_agreement")

    cfg = DistillConfig(e2e_steps=e2e_steps, e2e_lr=5e-4, short_spans=0.5)  # as recipes/fff-minilm.yaml

    def report(stage: str) -> None:
        fidelity = compare(student, teacher.model, teacher.tokenizer, heldout, cfg.max_length)
        print(stage, {key: round(fidelity[key], 4) for key in keys}, flush=True)

    report(f"top-{k} neurons per token, untrained:")
    if e2e_steps == 0:
        return
    batches = tokenize(teacher.tokenizer, training_text(None, cfg.short_spans, cfg.seed), cfg.max_length)
    end_to_end(student, teacher.model, batches, cfg, Progress())
    report(f"after {e2e_steps} end-to-end steps:")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
