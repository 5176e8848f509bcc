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
        self.owner.changed()

    def __setitem__(self, key, value):
        same = dict.get(self, key, _MISSING) is value
        super().__setitem__(key, value)
        if not same:
            self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def pop(self, *args):
        out = super().pop(*args)
        self._changed()
        return out

    def popitem(self):
        out = super().popitem()
        self._changed()
        return out

    def clear(self):
        super().clear()
        self._changed()

    def setdefault(self, key, default=None):
        new = key not in self
        out = super().setdefault(key, default)
        if new:
            self._changed()
        return out

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def __ior__(self, other):
        out = super().__ior__(other)
        self._changed()
        return out


_MISSING = object()


class TrackedState(defaultdict):
    """``opt.state``: param -> TrackedDict, with ``version`` bumped on every change of a key or of
    a value inside (see module docstring). ``foreign``: params whose state is a plain dict."""

    def __init__(self):
        super().__init__(None)
        self.version = 0
        self.foreign = {}  # param -> a state dict that is not ours, checked every step
        # called at every change: the optimizer drops its plan there and then, so that the
        # tensors the plan held (state moved off the GPU, say) are freed now, not at the next step
        self.listener = None

    def changed(self):
        self.version += 1
        if self.listener is not None:
            self.listener()

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
        super().__setitem__(key, self._adopt(key, value))
        self.changed()

    def __delitem__(self, key):
        self.foreign.pop(key, None)
        super().__delitem__(key)
        self.changed()

    def pop(self, key, *default):
        self.foreign.pop(key, None)
        out = super().pop(key, *default)
        self.changed()
        return out

    def popitem(self):
        key, value = super().popitem()
        self.foreign.pop(key, None)
        self.changed()
        return key, value

    def clear(self):
        self.foreign.clear()
        super().clear()
        self.changed()

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
