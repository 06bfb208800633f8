"""Tiny random models of every supported family (and one unsupported), built with no network."""

import torch
from transformers import (
    BertConfig, BertModel, DistilBertConfig, DistilBertModel, GPT2Config, GPT2LMHeadModel,
    LlamaConfig, LlamaForCausalLM, OPTConfig, OPTModel, RobertaConfig, RobertaModel,
)

HIDDEN, WIDTH, LAYERS = 32, 64, 2


def tiny(family: str, attn: str = "sdpa"):
    torch.manual_seed(0)
    common = dict(attn_implementation=attn)
    if family == "bert":
        cfg = BertConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=100)
        model = BertModel(cfg, **{})
    elif family == "roberta":
        cfg = RobertaConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=100)
        model = RobertaModel(cfg)
    elif family == "distilbert":
        cfg = DistilBertConfig(dim=HIDDEN, hidden_dim=WIDTH, n_layers=LAYERS, n_heads=4, vocab_size=100)
        model = DistilBertModel(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=HIDDEN, n_inner=WIDTH, n_layer=LAYERS, n_head=4, vocab_size=100)
        model = GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=100)
        model = LlamaForCausalLM(cfg)
    elif family == "opt":
        cfg = OPTConfig(hidden_size=HIDDEN, ffn_dim=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=100,
                        word_embed_proj_dim=HIDDEN)
        model = OPTModel(cfg)
    else:
        raise ValueError(family)
    model.config._attn_implementation = common["attn_implementation"]
    return model.eval()


FAMILIES = ["bert", "roberta", "distilbert", "gpt2", "llama"]
