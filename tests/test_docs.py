"""The public classes' docstrings read as plain text in a terminal (help(), IPython's ``?``):
no LaTeX, no line wider than 100 columns as help() shows it, plain ASCII (any locale's console
shows it), and every optimizer's docstring names each argument of its own constructor."""
import inspect
import re

import pytest
import torch

import fusedopt

PUBLIC = [getattr(fusedopt, name) for name in fusedopt.__all__]
OPTIMIZERS = [cls for cls in PUBLIC if issubclass(cls, torch.optim.Optimizer)]

# a LaTeX command, which a terminal shows as it is: a backslash before a letter (\frac,
# \leftarrow, \text, \begin, ...)
LATEX = re.compile(r"\\[A-Za-z]+")


def _ids(classes):
    return [cls.__name__ for cls in classes]


def test_every_public_optimizer_is_checked():
    assert {cls.__name__ for cls in OPTIMIZERS} == {
        "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "NAdam", "RAdam", "Adamax", "Lion", "LAMB",
        "Adafactor", "Muon"}


@pytest.mark.parametrize("cls", PUBLIC, ids=_ids(PUBLIC))
def test_docstring_has_no_latex(cls):
    doc = cls.__doc__
    assert doc, f"{cls.__name__} has no docstring"
    found = sorted(set(LATEX.findall(doc)))
    assert not found, f"{cls.__name__}.__doc__ has LaTeX commands {found}"
    assert ".. math::" not in doc and "$" not in doc


@pytest.mark.parametrize("cls", PUBLIC, ids=_ids(PUBLIC))
def test_docstring_lines_fit_100_columns(cls):
    # as written, and as help() shows them: the docstring's indent removed, 4 columns added
    wide = [line for line in cls.__doc__.splitlines() if len(line) > 100]
    wide += [line for line in inspect.cleandoc(cls.__doc__).splitlines() if 4 + len(line) > 100]
    assert not wide, f"{cls.__name__}.__doc__ has lines over 100 columns: {wide}"


@pytest.mark.parametrize("cls", PUBLIC, ids=_ids(PUBLIC))
def test_docstring_is_ascii(cls):
    odd = sorted({ch for ch in cls.__doc__
                  if not (ch.isascii() and (ch.isprintable() or ch == "\n"))})
    assert not odd, f"{cls.__name__}.__doc__ has characters a terminal may not show: {odd}"


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_docstring_names_every_constructor_argument(cls):
    doc = cls.__doc__
    names = [name for name, p in inspect.signature(cls.__init__).parameters.items()
             if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    missing = [name for name in names if not re.search(rf"\b{re.escape(name)}\b", doc)]
    assert not missing, f"{cls.__name__}.__doc__ never names {missing}"


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=_ids(OPTIMIZERS))
def test_docstring_states_the_update_rules(cls):
    """The rules are there, clip lines first, one per line, as plain assignments."""
    lines = [line.strip() for line in inspect.cleandoc(cls.__doc__).splitlines()]
    clamp = lines.index(next(line for line in lines if line.startswith("g <- clamp(g, -v, v)")))
    assert lines[clamp + 1].startswith("g <- g * min(1, n / (||g|| + 1e-6))")
    rules = lines[clamp + 2:lines.index("Args:")]
    assert any(line.startswith("p <- p - ") for line in rules), rules
