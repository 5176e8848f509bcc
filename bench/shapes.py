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


def get(name: str) -> list[tuple[int, ...]]:
    """The shape set called ``name`` (one of NAMES)."""
    if name not in SETS:
        raise KeyError(f"unknown shape set {name!r}; known: {', '.join(NAMES)}")
    return list(SETS[name])
