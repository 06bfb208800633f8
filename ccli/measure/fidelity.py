"""How closely a converted model still follows the original, on held-out text.

- per-layer FFN relative error: ||f_student(x) - f_teacher(x)||^2 / ||f_teacher(x) - mean||^2 on the
  student's own FFN inputs (the error each converted layer adds where it sits), and the mean
  per-token cosine of the two outputs (which, unlike the pooled error, outlier tokens cannot hide);
- final hidden-state cosine, mean over real tokens;
- pooled-embedding cosine (mean pooling over the attention mask, what sentence embedders use) and
  top-1 retrieval agreement: the first half of each held-out paragraph queries the second halves of
  all of them; agreement is how often the student's top-1 document is the teacher's, and each
  model's own top-1 accuracy (the matching paragraph) is reported too;
- pooled-embedding cosine on short inputs (the first SHORT_WORDS words of each query): converted
  models are weakest there, and short queries are what sentence embedders mostly see;
- for models with an LM head: KL(teacher || student) of next-token distributions, both
  perplexities, and next-token top-1 agreement (how often the student's most likely next token is
  the teacher's), over every real position of the queries.

`compare_domains` scores each text domain's held-out paragraphs separately (a conversion can be good
on the text it trained on and poor elsewhere), pools the domains it trained on and those it never
saw, and names the worst.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from ..arch import view
from ..capture import collect_ffn_inputs
from ..errors import CcliError
from .errors import relative_error, token_kl

SHORT_WORDS = 6


def _halves(paragraphs: list[str]) -> tuple[list[str], list[str]]:
    queries, docs = [], []
    for p in paragraphs:
        words = p.split()
        if len(words) < 8:
            continue
        cut = len(words) // 2
        queries.append(" ".join(words[:cut]))
        docs.append(" ".join(words[cut:]))
    return queries, docs


def _batches(model, tokenizer, texts: list[str], max_length: int, batch_size: int = 32):
    """Per batch of `texts`: (tokenised batch, last hidden states in fp32, logits or None), one batch
    at a time (an LM's logits for every text at once would take gigabytes)."""
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], truncation=True, max_length=max_length,
                        padding=True, return_tensors="pt")
        with torch.inference_mode():  # not held across the yield: two of these generators run interleaved
            out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
        # fp16/bf16 models are compared in fp32
        yield enc, out.hidden_states[-1].float(), getattr(out, "logits", None)


def _pooled(enc, hidden: torch.Tensor) -> torch.Tensor:
    """Mean-pooled normalised embeddings of a batch's real tokens (n, H)."""
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1)


def _encode(model, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    """Mean-pooled normalised embeddings (n, H) of `texts`."""
    return torch.cat([_pooled(enc, hidden) for enc, hidden, _ in _batches(model, tokenizer, texts, max_length)])


def ffn_fidelity(student: nn.Module, teacher: nn.Module, batches: list[dict]) -> dict:
    """Each converted FFN (replaced whole, or with converted linears inside) against the teacher
    model's FFN in the same block, on the student's own inputs (every real token of `batches`):
    {"ffn_rel_error": {layer: e}, "ffn_token_cosine": {layer: c}}.

    The relative error pools squared errors over all tokens, so the few tokens with very large FFN
    outputs dominate it: in all-MiniLM-L6-v2's blocks 0-2, [CLS] and [SEP] hold 80-94% of the output
    variance, and a converted layer with relative error 0.03 there can still miss ordinary tokens badly
    (median per-token error 0.4). The mean per-token cosine weighs every token alike and shows that."""
    arch, dense = view(student), view(teacher)
    errors, cosines = {}, {}
    for i, block in enumerate(arch.blocks):
        ffn = block.ffn
        if not ffn.converted:
            continue
        x = collect_ffn_inputs(student, arch, i, batches, sys.maxsize)
        with torch.inference_mode():
            pred, target = ffn.run(x), dense.blocks[i].ffn.run(x)
            errors[i] = round(relative_error(pred, target).item(), 5)
            cosines[i] = round(nn.functional.cosine_similarity(pred, target, dim=-1).mean().item(), 5)
    return {"ffn_rel_error": errors, "ffn_token_cosine": cosines}


def compare(student: nn.Module, teacher: nn.Module, tokenizer, paragraphs: list[str], max_length: int = 128) -> dict:
    """Fidelity of `student` to `teacher` on `paragraphs` (see module doc)."""
    queries, docs = _halves(paragraphs)
    if len(queries) < 2:
        raise CcliError("fidelity needs at least two held-out paragraphs of 8 or more words")
    t_docs, s_docs = _encode(teacher, tokenizer, docs, max_length), _encode(student, tokenizer, docs, max_length)
    short = [" ".join(q.split()[:SHORT_WORDS]) for q in queries]
    short_cos = nn.functional.cosine_similarity(_encode(teacher, tokenizer, short, max_length),
                                                _encode(student, tokenizer, short, max_length), dim=-1)

    # the queries: teacher and student batch by batch, each batch's measures taken before the next
    t_query, s_query, cos_tokens, kl_sum, nll_t, nll_s, lm_tokens, top1_same = [], [], [], 0.0, 0.0, 0.0, 0, 0
    for (enc, t_hidden, t_logits), (_, s_hidden, s_logits) in zip(_batches(teacher, tokenizer, queries, max_length),
                                                                   _batches(student, tokenizer, queries, max_length)):
        t_query.append(_pooled(enc, t_hidden))
        s_query.append(_pooled(enc, s_hidden))
        real = enc["attention_mask"].bool()
        cos_tokens.append(nn.functional.cosine_similarity(t_hidden[real], s_hidden[real], dim=-1))
        if t_logits is not None:
            shift = real[:, 1:]
            target = enc["input_ids"][:, 1:][shift]
            t_logp = torch.log_softmax(t_logits[:, :-1][shift].float(), -1)
            s_logp = torch.log_softmax(s_logits[:, :-1][shift].float(), -1)
            kl_sum += token_kl(t_logp, s_logp).sum().item()
            nll_t -= t_logp.gather(1, target[:, None]).sum().item()
            nll_s -= s_logp.gather(1, target[:, None]).sum().item()
            top1_same += (t_logp.argmax(-1) == s_logp.argmax(-1)).sum().item()
            lm_tokens += target.numel()
    t_query, s_query = torch.cat(t_query), torch.cat(s_query)

    t_top = (t_query @ t_docs.T).argmax(1)
    s_top = (s_query @ s_docs.T).argmax(1)
    truth = torch.arange(len(queries))
    result = {
        "paragraphs": len(queries),
        "hidden_cosine": round(torch.cat(cos_tokens).mean().item(), 5),
        "embedding_cosine": round(nn.functional.cosine_similarity(t_query, s_query, dim=-1).mean().item(), 5),
        "embedding_cosine_min": round(nn.functional.cosine_similarity(t_query, s_query, dim=-1).min().item(), 5),
        "embedding_cosine_short": round(short_cos.mean().item(), 5),
        "retrieval_agreement": round((t_top == s_top).float().mean().item(), 5),
        "retrieval_top1_teacher": round((t_top == truth).float().mean().item(), 5),
        "retrieval_top1_student": round((s_top == truth).float().mean().item(), 5),
    }
    if lm_tokens:
        result["kl"] = round(kl_sum / lm_tokens, 6)
        result["perplexity_teacher"] = round(float(torch.tensor(nll_t / lm_tokens).exp()), 4)
        result["perplexity_student"] = round(float(torch.tensor(nll_s / lm_tokens).exp()), 4)
        result["top1_agreement"] = round(top1_same / lm_tokens, 5)
        result["lm_tokens"] = lm_tokens
    return result


def _weighted(results: list[dict], key: str, weight: str = "paragraphs") -> float:
    total = sum(r[weight] for r in results)
    return sum(r[key] * r[weight] for r in results) / total


def pool(results: list[dict]) -> dict:
    """Several domains' `compare` results as one: means weighted by paragraphs (LM measures by
    tokens), worst cases the worst of all."""
    pooled = {"paragraphs": sum(r["paragraphs"] for r in results)}
    for key in ("hidden_cosine", "embedding_cosine", "embedding_cosine_short", "retrieval_agreement",
                "retrieval_top1_teacher", "retrieval_top1_student"):
        pooled[key] = round(_weighted(results, key), 5)
    pooled["embedding_cosine_min"] = min(r["embedding_cosine_min"] for r in results)
    if all("kl" in r for r in results):
        pooled["lm_tokens"] = sum(r["lm_tokens"] for r in results)
        pooled["kl"] = round(_weighted(results, "kl", "lm_tokens"), 6)
        for key in ("perplexity_teacher", "perplexity_student"):  # exp of the token-weighted mean NLL
            log_ppl = [{"v": math.log(r[key]), "lm_tokens": r["lm_tokens"]} for r in results]
            pooled[key] = round(math.exp(_weighted(log_ppl, "v", "lm_tokens")), 4)
        pooled["top1_agreement"] = round(_weighted(results, "top1_agreement", "lm_tokens"), 5)
    return pooled


def ranking_measure(result: dict) -> str:
    """What orders domains worst first: next-token agreement for LMs, pooled cosine otherwise."""
    return "top1_agreement" if "top1_agreement" in result else "embedding_cosine"


def compare_domains(student: nn.Module, teacher: nn.Module, tokenizer, sets, max_length: int = 128) -> dict:
    """`compare` on each of `sets` (ccli.data.EvalSet). The result's top-level measures pool the
    domains the conversion trained on (all of them when it trained on none); `domains` lists every
    domain worst first, `unseen` pools the domains it never trained on, `worst_domain` names the first."""
    domains = []
    for s in sets:
        if len(_halves(s.paragraphs)[0]) < 2:
            continue  # too few paragraphs long enough to score (a small user file); listed as unscored below
        domains.append({"domain": s.name, "seen": s.seen, **compare(student, teacher, tokenizer, s.paragraphs, max_length)})
    if not domains:
        raise CcliError("fidelity needs at least two held-out paragraphs of 8 or more words")
    measure = ranking_measure(domains[0])
    domains.sort(key=lambda d: d[measure])
    seen = [d for d in domains if d["seen"]] or domains
    result = {**pool(seen), "domains": domains, "worst_domain": domains[0]["domain"],
              "worst_domain_cosine": min(d["embedding_cosine"] for d in domains)}
    unseen = [d for d in domains if not d["seen"]]
    if unseen and unseen != domains:
        result["unseen"] = pool(unseen)
    skipped = [s.name for s in sets if s.name not in {d["domain"] for d in domains}]
    if skipped:
        result["unscored_domains"] = skipped
    return result
