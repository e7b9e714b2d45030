# Copyright (c) mmprecond contributors. All rights reserved.
"""Base updates' ``param_groups`` defaults, and variants of a family.

A *family* is one optimizer class whose base update (``'sgdm'``:
``torch.optim.SGD``, ``'adamw'``: ``torch.optim.AdamW``, both run by torch's
foreach kernels, see :mod:`mmprecond.optim.base`) is its ``base`` keyword.  A
registered name (``NKFAC``, ``AdaNKFAC``, ...) is a *variant*: a subclass
made by :func:`variant` from one row, the base update and the defaults of
the paper, recorded in :data:`VARIANTS`.
"""
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Tuple

from .base import check_positive
from .checks import check_momentum, reject_keywords

#: The ``param_groups`` keys of each base update (as torch's optimizers).
BASE_KEYWORDS: Dict[str, Tuple[str, ...]] = dict(
    sgdm=('lr', 'momentum', 'weight_decay', 'nesterov'),
    adamw=('lr', 'betas', 'eps', 'weight_decay'))

#: What a variant's row does not set (torch's values; momentum 0.9, the value
#: every SGDM variant here uses).
BASE_DEFAULTS: Dict[str, Dict[str, Any]] = dict(
    sgdm=dict(momentum=0.9, weight_decay=0.0, nesterov=False),
    adamw=dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))

_ALL_BASE_KEYWORDS = {k for keys in BASE_KEYWORDS.values() for k in keys}


def sgdm_defaults(lr: float, momentum: float, weight_decay: float,
                  nesterov: bool) -> Dict[str, Any]:
    """Defaults of an SGDM-based optimizer (``torch.optim.SGD`` keys)."""
    check_positive('lr', lr, allow_zero=True)
    check_momentum('momentum', momentum)
    check_positive('weight_decay', weight_decay, allow_zero=True)
    if nesterov and momentum <= 0:
        raise ValueError('nesterov momentum requires momentum > 0')
    return dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                nesterov=nesterov)


def adamw_defaults(lr: float, betas: Tuple[float, float], eps: float,
                   weight_decay: float) -> Dict[str, Any]:
    """Defaults of an AdamW-based optimizer (``torch.optim.AdamW`` keys)."""
    check_positive('lr', lr, allow_zero=True)
    check_positive('eps', eps, allow_zero=True)
    check_positive('weight_decay', weight_decay, allow_zero=True)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f'Invalid betas={betas!r}: a pair (beta1, beta2), '
                        'e.g. betas=(0.9, 0.999).')
    check_momentum('betas[0]', betas[0])
    check_momentum('betas[1]', betas[1])
    return dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)


def base_defaults(base: str, lr: float, **keys: Any) -> Dict[str, Any]:
    """Validated group defaults of ``base`` from a family's base keywords.

    Args:
        base (str): ``'sgdm'`` or ``'adamw'``.
        lr (float): Learning rate.
        **keys: ``momentum``, ``weight_decay``, ``nesterov``, ``betas``,
            ``eps``; ``None`` takes :data:`BASE_DEFAULTS`.

    Raises:
        ValueError: For an unknown ``base``.
        TypeError: For a key that ``base`` does not take (``momentum`` of an
            AdamW base, ...), given as anything but ``None``.

    Example:
        >>> base_defaults('sgdm', 0.1, momentum=None, nesterov=None, betas=None)
        {'lr': 0.1, 'momentum': 0.9, 'weight_decay': 0.0, 'nesterov': False}
    """
    if base not in BASE_KEYWORDS:
        raise ValueError(f'Invalid base: {base!r} (sgdm or adamw)')
    wrong = sorted(k for k, v in keys.items()
                   if v is not None and k not in BASE_KEYWORDS[base])
    if wrong:
        raise TypeError(f'the {base} base update takes no {", ".join(wrong)}')
    filled = {k: keys[k] if keys.get(k) is not None else BASE_DEFAULTS[base][k]
              for k in BASE_KEYWORDS[base] if k != 'lr'}
    make = sgdm_defaults if base == 'sgdm' else adamw_defaults
    return make(lr, **filled)


@dataclass(frozen=True)
class Variant:
    """One row of :data:`VARIANTS`: a registered name's family and defaults."""

    family: type
    base: str
    defaults: Dict[str, Any] = field(default_factory=dict)


#: Registered name -> its row (family, base update, defaults of the paper).
VARIANTS: Dict[str, Variant] = {}
_VARIANT_CLASSES: Dict[type, Variant] = {}


def variant(base: str, **defaults: Any) -> Callable[[type], type]:
    """Class decorator: make a subclass of a family a variant of it.

    The variant's constructor is keyword-only after ``params``, with the
    family's keywords minus ``base``, the keys of the other base update and
    the class's ``rejected_keywords``; its defaults are the family's, then
    the parent variant's (KFAC of NKFAC), then ``defaults``.  It hands every
    argument to the family by name.  ``inspect.signature`` (and so
    :func:`~mmprecond.optim.checks.accepted_keywords`) sees that signature.

    Args:
        base (str): The variant's base update, ``'sgdm'`` or ``'adamw'``.
        **defaults: The variant's defaults (the paper's settings).

    Example:
        >>> from mmprecond.optim import AdaNKFAC
        >>> VARIANTS['AdaNKFAC'].base
        'adamw'
        >>> 'momentum' in inspect.signature(AdaNKFAC).parameters
        False
    """
    if base not in BASE_KEYWORDS:
        raise ValueError(f'Invalid base: {base!r} (sgdm or adamw)')

    def make(cls: type) -> type:
        family = next(k for k in cls.__mro__[1:] if k not in _VARIANT_CLASSES)
        merged = dict(BASE_DEFAULTS[base])
        parent = _VARIANT_CLASSES.get(cls.__mro__[1])
        if parent is not None:
            merged.update(parent.defaults)
        merged.update(defaults)
        rejected = getattr(cls, 'rejected_keywords', {})
        fam_sig = inspect.signature(family.__init__)
        drop = {'base'} | (_ALL_BASE_KEYWORDS - set(BASE_KEYWORDS[base]))
        params = []
        for p in fam_sig.parameters.values():
            if p.name in drop or p.name in rejected:
                continue
            if p.name in merged:
                p = p.replace(default=merged[p.name])
            params.append(p)
        names = {p.name for p in params}
        unknown = sorted(set(defaults) - names)
        if unknown:
            raise TypeError(f'{cls.__name__}: {family.__name__} has no '
                            f'keyword(s) {unknown}')
        sig = fam_sig.replace(parameters=params)
        exclusive = getattr(cls, 'exclusive_keywords', ())

        def __init__(self, params: Any, **keywords: Any) -> None:
            reject_keywords(type(self), keywords)
            for a, b in exclusive:
                if a in keywords and keywords.get(b) is not None:
                    raise ValueError(
                        f'{type(self).__name__}: give {a} or {b}, not both '
                        f'({b} replaces the {a} term)')
            bound = sig.bind(self, params, **keywords)
            bound.apply_defaults()
            args = dict(bound.arguments)
            del args['self'], args['params']
            family.__init__(self, params, base=base, **args)

        __init__.__signature__ = sig  # type: ignore[attr-defined]
        __init__.__qualname__ = f'{cls.__qualname__}.__init__'
        __init__.__doc__ = f'See :class:`{family.__name__}` for the arguments.'
        cls.__init__ = __init__
        row = Variant(family, base, {k: v for k, v in merged.items() if k in names})
        VARIANTS[cls.__name__] = _VARIANT_CLASSES[cls] = row
        return cls

    return make



def extended_signature(init: Callable, **keywords: Any) -> inspect.Signature:
    """``init``'s signature with keyword-only ``keywords`` (name=default) added.

    For a family that adds keywords to its parent's and hands the rest on
    with ``**keywords``: setting the result as its ``__init__.__signature__``
    keeps its keywords visible to :func:`variant` and
    :func:`~mmprecond.optim.checks.accepted_keywords`.  The new keywords go
    before the shared options (``skip_nonfinite_steps``, ...).
    """
    sig = inspect.signature(init)
    params = list(sig.parameters.values())
    names = [p.name for p in params]
    at = names.index('skip_nonfinite_steps') if 'skip_nonfinite_steps' in names \
        else len(params)
    new = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v,
                             annotation=type(v)) for k, v in keywords.items()]
    return sig.replace(parameters=params[:at] + new + params[at:])
