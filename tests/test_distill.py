"""The end-to-end stage of the distillation engine (ccli.distill): what its loss compares."""

import copy

import pytest
import torch

from ccli.distill import DistillConfig, compared_states, distill, end_to_end_error, hidden_state_error
from ccli.measure.fidelity import relative_error
from ccli.errors import CcliError
from ccli.variants.ternary import TernaryVariant

from tiny import HIDDEN, LAYERS, tiny


def _batch(seed=0, n=3, length=10):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[1, 6:] = 0  # padding must not count
    return torch.randint(3, 100, (n, length), generator=g), mask


def test_all_blocks_target_is_the_mean_of_every_block_outputs_error():
    teacher = tiny("bert")
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # only the last block differs, so only its output and the final state do
        student.encoder.layer[LAYERS - 1].output.dense.weight.mul_(1.5)
    ids, mask = _batch()
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        t = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = int(mask.sum())
    blocks_s, blocks_t = compared_states(s, mask, "all"), compared_states(t, mask, "all")
    assert len(blocks_s) == LAYERS and all(h.shape == (real, HIDDEN) for h in blocks_s)
    last_s, last_t = compared_states(s, mask, "last"), compared_states(t, mask, "last")
    assert len(last_s) == 1 and torch.equal(last_s[0], blocks_s[-1])
    per_block = [relative_error(a, b).item() for a, b in zip(blocks_s, blocks_t)]
    assert per_block[0] == 0 and per_block[-1] > 0
    assert hidden_state_error(blocks_s, blocks_t).item() == pytest.approx(sum(per_block) / LAYERS)
    assert hidden_state_error(last_s, last_t).item() == pytest.approx(per_block[-1])


def _assert_end_to_end_trains(teacher, target: str) -> None:
    """Every linear of `teacher` ternary, then 30 end-to-end steps on `target`: kept, and the loss fell."""
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 100, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(4)]
    cfg = DistillConfig(steps=2, tokens=64, batch_tokens=32, e2e_steps=30, e2e_batch=4, e2e_lr=3e-3, e2e_target=target)
    _, report = distill(copy.deepcopy(teacher), teacher, TernaryVariant(targets="all"), batches, cfg)
    assert report.e2e_kept is True
    assert sum(report.e2e_losses[-5:]) < sum(report.e2e_losses[:5])


def test_end_to_end_on_every_block_output_trains_and_is_kept():
    _assert_end_to_end_trains(tiny("bert"), "all")


def test_logits_target_is_the_mean_next_token_kl_and_trains_a_language_model():
    teacher = tiny("llama")
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.model.layers[LAYERS - 1].mlp.down_proj.weight.mul_(1.5)
    ids, mask = _batch()
    with torch.no_grad():
        s, t = (compared_states(m(input_ids=ids, attention_mask=mask), mask, "logits") for m in (student, teacher))
    assert s[0].shape == (int(mask.sum()), teacher.config.vocab_size)
    expected = torch.nn.functional.kl_div(torch.log_softmax(s[0], -1), torch.log_softmax(t[0], -1),
                                          log_target=True, reduction="batchmean")
    assert end_to_end_error(s, t, "logits").item() == pytest.approx(expected.item(), rel=1e-5)
    assert end_to_end_error(t, t, "logits").item() == pytest.approx(0.0, abs=1e-6)
    _assert_end_to_end_trains(teacher, "logits")


def test_logits_target_on_a_model_without_an_lm_head_is_refused_before_training():
    teacher = tiny("bert")
    cfg = DistillConfig(steps=1, tokens=8, e2e_steps=1, e2e_target="logits")
    with pytest.raises(CcliError, match="--e2e-target logits needs a language model"):
        distill(copy.deepcopy(teacher), teacher, TernaryVariant(targets="all"), [], cfg)


def test_unknown_end_to_end_target_is_a_clear_error():
    with pytest.raises(CcliError, match="--e2e-target must be one of last, all, logits"):
        DistillConfig(e2e_target="first").validate()


def test_a_modules_auxiliary_loss_is_trained_layer_wise():
    """fit_layer adds each converted module's own loss (ConvertedModule.auxiliary_loss) to the
    distillation loss: here a parameter that only the auxiliary loss reaches is pulled to its target."""
    from torch import nn

    from ccli.distill import auxiliary_loss, fit_layer
    from ccli.variants.base import ConvertedModule

    class WithAux(ConvertedModule):
        unit_kind = "ffn"

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(HIDDEN, HIDDEN)
            self.side = nn.Parameter(torch.zeros(()))
            self._aux = None

        def forward(self, x):
            if self.training:
                self._aux = (self.side - 3.0) ** 2
            return self.linear(x)

        def auxiliary_loss(self):
            aux, self._aux = self._aux, None
            return aux

    layer = WithAux()
    x = torch.randn(256, HIDDEN)
    fit_layer(layer, x, x.clone(), DistillConfig(steps=200, batch_tokens=64, lr=0.05), seed=0)
    assert abs(layer.side.item() - 3.0) < 0.1
    assert auxiliary_loss([layer]) == 0.0  # read once, then forgotten


def test_anchor_penalty_is_the_relative_distance_from_the_initial_weights():
    from torch import nn

    from ccli.distill import anchor_penalty, set_anchor

    layer = nn.Linear(4, 3)
    set_anchor(layer)
    assert anchor_penalty([layer], 2.0).item() == 0.0
    with torch.no_grad():
        layer.weight.mul_(1.5)  # ||0.5 w||² / ||w||² = 0.25; the bias has not moved
    assert anchor_penalty([layer], 2.0).item() == pytest.approx(2.0 * (0.25 + 0.0) / 2)
    assert anchor_penalty([layer], 0.0) == 0.0 and anchor_penalty([nn.Linear(4, 3)], 1.0) == 0.0  # off, or no anchor


def test_anchor_keeps_training_closer_to_the_initialisation():
    """The same layer-wise and end-to-end run with and without --anchor: the anchored weights end nearer
    where they started (the dense layer's, quantised), and the pull is part of the saved checkpoint."""
    from ccli.distill import ANCHOR
    from ccli.variants.module import converted_modules

    teacher = tiny("bert")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 100, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(4)]
    moved = {}
    for anchor in (0.0, 50.0):
        cfg = DistillConfig(steps=30, tokens=64, batch_tokens=32, e2e_steps=20, e2e_batch=4, e2e_lr=3e-3, lr=3e-3, anchor=anchor)
        student = copy.deepcopy(teacher)
        distill(student, teacher, TernaryVariant(targets="ffn"), batches, cfg, finalize=False)
        if anchor:
            modules = converted_modules(student)
            assert modules and all(getattr(m, ANCHOR, None) for m in modules)
            moved[anchor] = sum(float((p - getattr(m, ANCHOR)[n]).norm()) for m in modules
                                for n, p in m.named_parameters() if n in getattr(m, ANCHOR))
        else:
            reference = student
    anchored_names = {n for m in converted_modules(student) for n in getattr(m, ANCHOR)}
    free = sum(float((p - getattr(m_a, ANCHOR)[n]).norm())
               for m_a, m_f in zip(converted_modules(student), converted_modules(reference))
               for n, p in m_f.named_parameters() if n in anchored_names)
    assert moved[50.0] < 0.5 * free


def test_block_units_weigh_every_token_alike_whatever_its_scale():
    # a residual stream with one "massive activation" token (as SmolLM2's first token): the pooled
    # relative error hardly sees a wrong ordinary token, the per-token one block units train on does
    from ccli.capture import BlockCall, BlockCalls, TokenRows
    from ccli.measure.errors import token_relative_error

    target = torch.randn(8, 16)
    target[0] *= 1000.0
    pred = target.clone()
    pred[3] = -target[3]  # one ordinary token pointing the wrong way
    assert relative_error(pred, target).item() < 1e-3
    assert token_relative_error(pred, target).item() == pytest.approx(4.0 / 8, rel=1e-5)  # ||2t||^2 / ||t||^2, one of 8
    calls = BlockCalls([BlockCall(target[None], {}, torch.ones(1, 8, dtype=torch.bool))])
    assert calls.error(pred, target).item() == pytest.approx(token_relative_error(pred, target).item())
    assert TokenRows(target).error(pred, target).item() == pytest.approx(relative_error(pred, target).item())
