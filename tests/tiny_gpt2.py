"""The model and the comparison the HF Trainer and accelerate integration tests share: a 2-layer
GPT-2 (n_embd=32) from a config, the Trainer's weight-decay groups, and fp32 agreement of two
runs' params. 8 steps at lr 1e-2 with max_grad_norm 0.5: the reference runs' pre-clip norms
(0.57 to 1.07) exceed it at every step."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel

STEPS, LR, CLIP, WD, EMBD = 8, 1e-2, 0.5, 0.1, 32
INF_AT, SCALE = 3, 2.0 ** 8  # the step whose gradient gets an inf; the fp16 scaler's scale


def gpt2():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=EMBD, vocab_size=97, n_positions=32)
    return GPT2LMHeadModel(config)


def groups(model):
    """The Trainer's param groups (weight decay on all but biases and LayerNorms), for an
    optimizer built by hand."""
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or ".ln_" in n]
    decay = [p for n, p in model.named_parameters() if not ("bias" in n or ".ln_" in n)]
    return [{"params": decay, "weight_decay": WD}, {"params": no_decay, "weight_decay": 0.0}]


def assert_same_params(ours, ref):
    """fp32 agreement after STEPS steps. fusedopt folds the clip coefficient into the fused
    AdamW's grad_scale (a division where torch multiplies): a few fp32 ulps per step, amplified
    by nothing here but Adam's normalisation, so the conftest fp32 tolerance (rtol 1e-5, atol
    1e-6; measured worst in the Trainer test: 2.5e-7 absolute) holds.

    Except the attention key bias, c_attn.bias[EMBD:2 * EMBD]: its exact gradient is zero (q.b_k
    adds the same to every score of a query, which softmax ignores), so its fp32 gradient is
    rounding noise (4e-12 at step 0), which AdamW turns into steps of lr * |g| / (|g| + eps), ~4e-6
    with eps=1e-8, of random sign: noise in any two implementations (torch's fused AdamW against
    torch's foreach AdamW end 1.2e-5 apart there). It is held to what STEPS such steps reach
    from its zero init with noise under 1e-10: STEPS * lr * 1e-2."""
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        if name.endswith("attn.c_attn.bias"):
            keys = slice(EMBD, 2 * EMBD)
            for x in (a, b):
                assert x[keys].abs().max() < STEPS * LR * 1e-2, name
            a, b = torch.cat([a[:EMBD], a[2 * EMBD:]]), torch.cat([b[:EMBD], b[2 * EMBD:]])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
