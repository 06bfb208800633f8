"""The relative errors distillation minimises and fidelity reports (no imports from the rest of ccli,
so that capture, distillation and measurement can all use them)."""

from __future__ import annotations

import torch


def relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||pred - target||^2 / ||target - mean(target)||^2: 0 is perfect, 1 is as bad as predicting the mean."""
    centred = target - target.mean(0, keepdim=True)
    return (pred - target).pow(2).sum() / centred.pow(2).sum().clamp_min(1e-12)


def token_kl(teacher_logp: torch.Tensor, student_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of each row's distribution, from log-probabilities (rows, classes)."""
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)


def token_relative_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over tokens (rows) of ||pred - target||^2 / ||target||^2: every token weighs alike,
    whatever its scale. For hidden states of the residual stream, which the next norm rescales per
    token: there a pooled error sees only the few "massive activation" tokens (SmolLM2's first token
    has norm ~22,700 from block 12 on, the others ~130-750) and says nothing about the rest."""
    return ((pred - target).pow(2).sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()
