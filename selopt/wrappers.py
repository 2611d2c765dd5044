"""``selopt.unwrap``: the selopt optimizer inside the wrappers that training frameworks put around it.

accelerate's ``accelerator.prepare(opt)`` returns an ``AcceleratedOptimizer``,
and ``transformers.Trainer`` hands its callbacks (and keeps as
``trainer.optimizer``) that wrapper. The wrapper steps, zeroes and saves like
the optimizer, but it has none of selopt's own methods (``update_stats``,
``track_updates``, ``set_soft_mask``). These wrappers, and Lightning's
``LightningOptimizer``, keep the optimizer they wrap as ``.optimizer``.
"""

from __future__ import annotations

from selopt.optim import AdamW


def innermost(optimizer):
    """The innermost selopt optimizer along ``.optimizer`` from ``optimizer``, or else the last object there.

    The chain is followed even through objects that are selopt optimizers by
    ``isinstance``: Lightning's ``LightningOptimizer`` takes the class of the
    optimizer it wraps, yet steps the inner one, whose state it does not share.
    """
    chain = [optimizer]
    while True:
        inner = getattr(chain[-1], "optimizer", None)
        if inner is None or any(inner is seen for seen in chain):  # the end, or a wrapper that names itself
            break
        chain.append(inner)
    selopt_ones = [obj for obj in chain if isinstance(obj, AdamW)]
    return selopt_ones[-1] if selopt_ones else chain[-1]


def class_name(obj) -> str:
    """``obj``'s class with its module, e.g. ``torch.optim.adamw.AdamW``: a bare ``AdamW`` would be ambiguous."""
    cls = type(obj)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def unwrap(optimizer) -> AdamW:
    """The selopt optimizer ``optimizer`` is or wraps (through ``.optimizer``, as accelerate and Trainer wrap it).

    Raises ``TypeError`` naming the innermost optimizer's class when there is
    no selopt optimizer inside.

    >>> class Wrapper:  # stands in for accelerate's AcceleratedOptimizer
    ...     def __init__(self, optimizer):
    ...         self.optimizer = optimizer
    >>> opt = selopt.MoFO(torch.nn.Linear(4, 4).parameters(), lr=1e-3)
    >>> selopt.unwrap(Wrapper(opt)) is opt
    True
    >>> selopt.unwrap(Wrapper(opt)).track_updates()  # then .update_stats() after a step
    """
    found = innermost(optimizer)
    if not isinstance(found, AdamW):
        raise TypeError(f"expected a selopt optimizer (selopt.AdamW or selopt.MoFO), possibly wrapped, "
                        f"got {class_name(found)}")
    return found
