"""``opt.state`` that counts its own changes, so the Triton path's cached tables can trust it.

The launch tables hold the addresses of state tensors. Anything that puts another tensor into the
state (``opt.state[p]["exp_avg"] = torch.zeros_like(p)``, ``opt.state[p] = {}``, ``del``,
``clear()``, ``update()``, a moved-state loop ``state[k] = v.to(device)``) must reach them before
the next launch. ``TrackedState`` (the outer dict, a defaultdict as torch.optim's) and its
``TrackedDict`` values bump one counter on every such change, so a step checks one integer
instead of looking up every state tensor of every parameter (fusedopt/_triton_step.py).

A plain dict the user stores as a parameter's state (``opt.state[p] = {"momentum_buffer": b}``)
is kept as it is, since the user may still hold and change it and torch.optim would see those
changes: those few dicts are listed in ``foreign`` and checked entry by entry at every step.
What the counter cannot see is a tensor's own storage changing in place (``.data =``, ``set_``);
the step compares the addresses of every tensor in its tables for that.
"""
from collections import defaultdict


class TrackedDict(dict):
    """One parameter's state; every change bumps its owner's ``version``. A value set to the
    object already there is no change (torch-path steps store the same buffer back)."""

    __slots__ = ("owner",)

    def __init__(self, owner, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.owner = owner

    def __reduce__(self):  # pickle / deepcopy: a plain dict (its TrackedState re-tracks it)
        return (dict, (dict(self),))

    def _changed(self):
        self.owner.version += 1

    def __setitem__(self, key, value):
        if dict.get(self, key, _MISSING) is not value:
            self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self):
        self._changed()
        super().clear()

    def setdefault(self, key, default=None):
        if key not in self:
            self._changed()
        return super().setdefault(key, default)

    def update(self, *args, **kwargs):
        self._changed()
        super().update(*args, **kwargs)

    def __ior__(self, other):
        self._changed()
        return super().__ior__(other)


_MISSING = object()


class TrackedState(defaultdict):
    """``opt.state``: param -> TrackedDict, with ``version`` bumped on every change of a key or of
    a value inside (see module docstring). ``foreign``: params whose state is a plain dict."""

    def __init__(self):
        super().__init__(None)
        self.version = 0
        self.foreign = {}  # param -> a state dict that is not ours, checked every step

    def __reduce__(self):  # pickle / deepcopy: rebuilt with tracked copies of the dicts
        return (tracked_copy, (dict(self),))

    def __missing__(self, key):  # what defaultdict(dict) does, with a tracked dict
        value = self[key] = TrackedDict(self)
        return value

    def _adopt(self, key, value):
        """Stores ``value`` as it is (torch.optim would use that very object); a value that is
        not one of our tracked dicts is listed in ``foreign``."""
        self.foreign.pop(key, None)
        if not (type(value) is TrackedDict and value.owner is self):
            self.foreign[key] = value
        return value

    def __setitem__(self, key, value):
        self.version += 1
        super().__setitem__(key, self._adopt(key, value))

    def __delitem__(self, key):
        self.version += 1
        self.foreign.pop(key, None)
        super().__delitem__(key)

    def pop(self, key, *default):
        self.version += 1
        self.foreign.pop(key, None)
        return super().pop(key, *default)

    def popitem(self):
        self.version += 1
        key, value = super().popitem()
        self.foreign.pop(key, None)
        return key, value

    def clear(self):
        self.version += 1
        self.foreign.clear()
        super().clear()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self


def tracked_copy(state) -> TrackedState:
    """A TrackedState holding tracked copies of ``state``'s per-parameter dicts: for state that
    torch made and nobody else holds (the constructor's, load_state_dict's). A ``opt.state``
    that the user replaced is not copied: the step then checks it entry by entry."""
    out = TrackedState()
    for key, value in state.items():
        out[key] = TrackedDict(out, value)
    return out
