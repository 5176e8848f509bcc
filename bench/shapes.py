"""Named sets of parameter shapes for the benchmarks, each a list of tuples, one tuple per tensor.

Every benchmark takes its shapes from here (``get(name)``), never from its own literals. Each set
says where it comes from.
"""


def _gpt2_small() -> list[tuple[int, ...]]:
    """GPT-2 small (124M), in the order of Hugging Face's GPT2LMHeadModel.named_parameters().

    Conv1D weights are stored (in_features, out_features). lm_head is tied to wte, so it is not
    a tensor of its own (the optimizer sees 148 tensors).
    """
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]  # wte, wpe
    for _ in range(layers):
        shapes += [
            (d,), (d,),            # ln_1.weight, ln_1.bias
            (d, 3 * d), (3 * d,),  # attn.c_attn.weight, .bias
            (d, d), (d,),          # attn.c_proj.weight, .bias
            (d,), (d,),            # ln_2.weight, ln_2.bias
            (d, 4 * d), (4 * d,),  # mlp.c_fc.weight, .bias
            (4 * d, d), (d,),      # mlp.c_proj.weight, .bias
        ]
    shapes += [(d,), (d,)]  # ln_f.weight, ln_f.bias
    return shapes


def _llama_1b() -> list[tuple[int, ...]]:
    """A Llama-style ~1.1B model, TinyLlama-1.1B's configuration: vocab 32000, hidden 2048, MLP
    5632, 22 layers, 32 query heads and 4 key/value heads (grouped-query attention: k and v
    project to 4 x 64 = 256), RMSNorm weights, untied embedding and LM head: 201 tensors."""
    vocab, d, mlp, layers, kv = 32000, 2048, 5632, 22, 256
    shapes = [(vocab, d)]  # embed_tokens
    for _ in range(layers):
        shapes += [
            (d, d), (kv, d), (kv, d), (d, d),  # q_proj, k_proj, v_proj, o_proj
            (mlp, d), (mlp, d), (d, mlp),      # gate_proj, up_proj, down_proj
            (d,), (d,),                        # input_layernorm, post_attention_layernorm
        ]
    shapes += [(d,), (vocab, d)]  # norm, lm_head
    return shapes


def _resnet50() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50 (no torchvision needed): stem, bottleneck stages of 3, 4, 6 and 3
    blocks (1x1, 3x3, 1x1 convs with BatchNorm weight and bias each, a 1x1 downsample conv + BN
    in each stage's first block), fc: 161 tensors, 25.6M parameters."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # conv1, bn1
    inplanes = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if b == 0:
                shapes += [(planes * 4, inplanes, 1, 1), (planes * 4,), (planes * 4,)]
            inplanes = planes * 4
    shapes += [(1000, 2048), (1000,)]  # fc
    return shapes


def numel(shapes: list[tuple[int, ...]]) -> int:
    """Total elements over all tensors of a shape set (a 0-dim tensor holds one)."""
    total = 0
    for shape in shapes:
        n = 1
        for size in shape:
            n *= size
        total += n
    return total


SETS: dict[str, list[tuple[int, ...]]] = {
    # A real model: few tensors, two of them large (wte is 31% of all elements).
    "gpt2-small": _gpt2_small(),
    # The large-model regime: ~1.1B parameters, 4.4 GB per fp32 copy (too big for AdamW on the
    # 24 GB CPU machines with the benchmark's spare copies; a GPU default).
    "llama-1b": _llama_1b(),
    # A conv net: many small BatchNorm vectors beside a few large conv kernels.
    "resnet50": _resnet50(),
    # Launch- and bookkeeping-bound: many tensors of 16 KiB each in fp32 (8.2M elements), the
    # regime of per-tensor Python loops and of the multi-tensor-apply chunking.
    "many-small": [(4096,)] * 2000,
    # For a quick run that the script works end to end: a 0-dim tensor, sizes off any power of
    # two, and one a little past 4096 (a block boundary).
    "smoke": [(), (1,), (127,), (33, 65), (4097,), (3, 5, 7)],
}
NAMES = tuple(SETS)

assert len(SETS["gpt2-small"]) == 148, len(SETS["gpt2-small"])
assert numel(SETS["gpt2-small"]) == 124_439_808, numel(SETS["gpt2-small"])  # "124M"
assert len(SETS["llama-1b"]) == 201, len(SETS["llama-1b"])
assert numel(SETS["llama-1b"]) == 1_100_048_384, numel(SETS["llama-1b"])  # TinyLlama's "1.1B"
assert len(SETS["resnet50"]) == 161, len(SETS["resnet50"])
assert numel(SETS["resnet50"]) == 25_557_032, numel(SETS["resnet50"])  # torchvision's count


def get(name: str) -> list[tuple[int, ...]]:
    """The shape set called ``name`` (one of NAMES)."""
    if name not in SETS:
        raise KeyError(f"unknown shape set {name!r}; known: {', '.join(NAMES)}")
    return list(SETS[name])
