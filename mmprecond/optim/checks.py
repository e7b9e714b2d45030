# Copyright (c) mmprecond contributors. All rights reserved.
"""Build-time checks of optimizer arguments, with messages that say the fix.

Every check raises (or, for a legal but surprising setting, logs) one
message naming the config field, the value given and what to write instead,
so that a wrong config fails when the optimizer is built rather than hours
into training.
"""
import inspect
import numbers
from typing import Any, Dict, List, Mapping, Optional

from mmengine.logging import print_log

__all__ = ['check_interval', 'check_integer', 'RENAMED_KEYWORDS',
           'check_damping', 'check_budget', 'check_number',
           'check_momentum', 'check_coefficients', 'check_refresh_interval',
           'warn_unaligned_interval',
           'accepted_keywords', 'check_keywords', 'reject_keywords']

#: Keys that MMEngine / mmdet base configs give SGD and that an Adam-based
#: optimizer does not take.  Config inheritance merges ``optimizer=dict(...)``
#: into the base's dict, so they reach the optimizer unless the child config
#: says ``_delete_=True``.
SGD_ONLY_KEYS = ('momentum', 'nesterov', 'dampening')

#: Keywords of earlier releases and their current names (one vocabulary for
#: every family, ``docs/vocabulary.md``).  A config that still uses an old
#: name fails at build time with the new one in the message.
RENAMED_KEYWORDS: Dict[str, str] = {
    'inv_interval': 'refresh_interval',
    'basis_interval': 'refresh_interval',
    'shard_inverses': 'shard_refresh',
    'shard_basis': 'shard_refresh',
    'relative_damping': 'abs_damping',
}


def check_interval(name: str, value: Any) -> int:
    """Return ``value`` if it is an integer number of steps ``>= 1``.

    Args:
        name (str): The config field, e.g. ``'inv_interval'``.
        value: What the config gave.

    Raises:
        ValueError: For floats (``1e3`` is a float in Python), bools,
            strings and values ``< 1``.

    Example:
        >>> check_interval('stat_interval', 100)
        100
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ''
        if isinstance(value, numbers.Real) and float(value).is_integer():
            hint = f' (write {name}={int(value)}: 1e3 is a float in Python)'
        raise ValueError(
            f'Invalid {name}={value!r}: it counts optimizer steps and must be '
            f'an integer >= 1{hint}.')
    if value < 1:
        raise ValueError(
            f'Invalid {name}={value}: it counts optimizer steps and must be '
            f'>= 1 ({name}=1 means every step).')
    return int(value)


def check_integer(name: str, value: Any, minimum: int = 0) -> int:
    """Return ``value`` if it is an integer ``>= minimum`` (not a bool).

    The one validator of integer keywords that are not step intervals
    (iteration counts, history lengths, sizes): ``ns_iters=10.7`` is refused
    rather than truncated to 10.

    Args:
        name (str): The config field, e.g. ``'ns_iters'``.
        value: What the config gave.
        minimum (int): The smallest accepted value.

    Raises:
        ValueError: For floats, bools, strings and values ``< minimum``.

    Example:
        >>> check_integer('ns_iters', 10, minimum=1)
        10
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        hint = ''
        if isinstance(value, numbers.Real) and float(value).is_integer():
            hint = f' (write {name}={int(value)})'
        raise ValueError(
            f'Invalid {name}={value!r}: an integer >= {minimum} is '
            f'required{hint}.')
    if value < minimum:
        raise ValueError(f'Invalid {name}={value}: must be >= {minimum}.')
    return int(value)


def check_number(name: str, value: Any) -> float:
    """Return ``value`` as a float if it is a real number (not a bool).

    A config is Python, so ``lr='1e-3'`` is a string; comparing it with a
    bound would raise ``TypeError: '>=' not supported between instances of
    'str' and 'int'`` without saying which field is wrong.

    Args:
        name (str): The config field, e.g. ``'lr'`` or ``'betas[0]'``.
        value: What the config gave.

    Raises:
        TypeError: Naming the field, the type given and how to write it.

    Example:
        >>> check_number('lr', 1e-3)
        0.001
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        hint = ''
        if isinstance(value, str):
            try:
                hint = (f' (write {name}={float(value)!r} without quotes: a '
                        'quoted number is a string in a Python config)')
            except ValueError:
                pass
        raise TypeError(
            f'Invalid {name}={value!r}: it must be a number, got '
            f'{type(value).__name__}{hint}.')
    return float(value)


def check_momentum(name: str, value: Any) -> float:
    """Return ``value`` if it is a momentum / EMA coefficient in ``[0, 1)``.

    ``torch.optim.Adam`` refuses betas outside ``[0, 1)``; ``torch.optim.SGD``
    only refuses negative momentum, but with ``momentum >= 1`` the buffer
    ``buf = mu * buf + g`` never forgets a gradient and grows without bound,
    so it is refused here as well.

    Args:
        name (str): The config field, e.g. ``'momentum'`` or ``'betas[1]'``.
        value: What the config gave.

    Raises:
        TypeError: If ``value`` is not a number.
        ValueError: Naming the field, the range and the usual value.

    Example:
        >>> check_momentum('momentum', 0.9)
        0.9
    """
    value = check_number(name, value)
    if not 0.0 <= value < 1.0:
        usual = {'betas[1]': 0.999}.get(name, 0.9)
        raise ValueError(
            f'Invalid {name}={value!r}: a momentum coefficient must lie in '
            f'[0, 1) (at 1 or above the average never forgets and grows '
            f'without bound); the usual value is {name}={usual}.')
    return value


def check_refresh_interval(owner: str, name: str, interval: int,
                           stat_interval: int) -> None:
    """Refuse a refresh interval shorter than ``stat_interval``.

    A refresh between two statistics steps sees the same factors as the
    previous one, so ``interval < stat_interval`` only recomputes the same
    inverses (or bases) again at full cost.

    Raises:
        ValueError: Naming both fields and the smallest sensible value.

    Example:
        >>> check_refresh_interval('NKFAC', 'inv_interval', 1000, 100)
    """
    if interval < stat_interval:
        raise ValueError(
            f'[{owner}] Invalid {name}={interval} < stat_interval='
            f'{stat_interval}: statistics are only collected every '
            f'{stat_interval} steps, so refreshes in between recompute the '
            f'same result. Use {name}={stat_interval} or a multiple of it '
            f'(the papers use {name} = 10 x stat_interval), or lower '
            'stat_interval.')


def check_damping(value: Any, name: str = 'damping') -> float:
    """Return ``value`` if it is a relative damping ``eta`` in ``(0, 1)``.

    ``eta`` scales the largest eigenvalue of a factor: ``eta = 0`` leaves
    only the absolute floor (a near-singular factor is then inverted
    almost as is), ``eta >= 1`` drowns the curvature in the identity.

    Raises:
        ValueError: Naming the field and the usual value.
    """
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not 0.0 < float(value) < 1.0):
        raise ValueError(
            f'Invalid {name}={value!r}: the relative damping eta must lie in '
            f'(0, 1) (it is multiplied by the factor\'s largest eigenvalue); '
            f'the papers use {name}=0.01.')
    return float(value)


def warn_unaligned_interval(owner: str, name: str, interval: int,
                            stat_interval: int) -> None:
    """Refuse ``interval < stat_interval``; log once, at build time, if
    ``interval`` is not a multiple of ``stat_interval``.

    A longer interval that is not a multiple is legal: statistics are
    folded at steps ``0, S, 2S, ...`` and the refresh at step ``t`` uses
    the factors as of the last of those, so the refreshes see an uneven
    number of new statistics and some use factors up to ``S - 1`` steps old.
    """
    check_refresh_interval(owner, name, interval, stat_interval)
    if interval % stat_interval == 0:
        return
    lo = interval // stat_interval * stat_interval
    print_log(
        f'[{owner}] {name}={interval} is not a multiple of stat_interval='
        f'{stat_interval}: statistics are collected every {stat_interval} '
        f'steps and each refresh uses the statistics collected up to that '
        f'step, so refreshes see an uneven number of new statistics and may '
        f'use statistics up to {stat_interval - 1} steps old. To refresh '
        f'right after a statistics step, use a multiple, e.g. {name}='
        f'{max(lo, stat_interval)}.',
        logger='current', level=30)


def accepted_keywords(cls: type) -> List[str]:
    """Keyword arguments ``cls(...)`` accepts (empty if they are unknown).

    A class that declares ``rejected_keywords`` (e.g. KFAC, whose Newton
    settings are refused) passes its ``**kwargs`` on to its parent, whose
    keywords are then followed; any other ``**kwargs`` makes the set
    unknown.  Rejected keywords are left out.
    """
    names: List[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get('__init__')
        if init is None:
            continue
        try:
            params = list(inspect.signature(init).parameters.values())[1:]
        except (TypeError, ValueError):
            return []
        names += [p.name for p in params if p.kind in (
            p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in names]
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
        if 'rejected_keywords' not in klass.__dict__:
            return []  # **kwargs go somewhere we cannot see
    rejected = getattr(cls, 'rejected_keywords', {})
    return [n for n in names if n not in rejected]


def reject_keywords(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Raise for renamed keywords and for those ``cls`` inherits but does not use.

    Renamed keywords are :data:`RENAMED_KEYWORDS` plus the class's own
    ``renamed_keywords`` (old name -> new name, for a rename that only
    applies to that class, e.g. ``damping`` -> ``abs_damping`` where the
    class's damping is absolute).

    Raises:
        ValueError: Naming each such keyword and why it does not apply.
    """
    names = {**RENAMED_KEYWORDS, **getattr(cls, 'renamed_keywords', {})}
    renamed = [k for k in kwargs if k in names]
    if renamed:
        raise ValueError(
            f'{cls.__name__}: ' + '; '.join(
                f'{k} was renamed {names[k]} (write '
                f'{names[k]}={kwargs[k]!r})' for k in renamed)
            + '. See docs/vocabulary.md.')
    rejected: Dict[str, str] = getattr(cls, 'rejected_keywords', {})
    given = [k for k in kwargs if k in rejected]
    if given:
        raise ValueError(
            f'{cls.__name__} got ' + '; '.join(
                f'{k}={kwargs[k]!r}: {rejected[k]}' for k in given))


def check_coefficients(cfg: Mapping[str, Any]) -> None:
    """Check ``momentum`` and ``betas`` in a config before the class sees it.

    The mmprecond optimizers check them in their defaults as well; doing it
    here also covers the peer optimizers, whose own checks (if any) say
    less.

    Raises:
        TypeError, ValueError: As :func:`check_momentum`.

    Example:
        >>> check_coefficients(dict(type='NKFAC', momentum=0.9))
    """
    if 'momentum' in cfg:
        check_momentum('momentum', cfg['momentum'])
    betas = cfg.get('betas')
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        check_momentum('betas[0]', betas[0])
        check_momentum('betas[1]', betas[1])


def check_keywords(cls: type, cfg: Mapping[str, Any],
                   ignore: tuple = ('type', )) -> None:
    """Check an optimizer config's keys against what ``cls`` accepts.

    Args:
        cls (type): The optimizer class.
        cfg (Mapping): The ``optimizer=dict(...)`` config.
        ignore (tuple): Keys that are not constructor arguments.

    Raises:
        ValueError: Listing the unknown keys, the keys that exist and, for
            SGD keys inherited from a base config, the ``_delete_=True`` fix.

    Example:
        >>> import torch
        >>> check_keywords(torch.optim.AdamW, dict(type='AdamW', lr=1e-3))
    """
    reject_keywords(cls, cfg)
    check_coefficients(cfg)
    valid = accepted_keywords(cls)
    if not valid:
        return  # signature not inspectable, or (*args, **kwargs) only
    first = valid[0]
    unknown = [k for k in cfg if k not in valid and k not in ignore
               and k != first]
    if not unknown:
        return
    msg = (f'{cls.__name__} got unknown optimizer keyword(s) '
           f'{", ".join(map(repr, unknown))}. It accepts: '
           f'{", ".join(v for v in valid if v not in (first, "model"))}.')
    inherited = [k for k in unknown if k in SGD_ONLY_KEYS]
    if inherited:
        msg += (f' {", ".join(inherited)} usually come(s) from a base '
                "config's SGD optimizer: optimizer dicts are merged into the "
                "base's, so write optimizer=dict(_delete_=True, type='"
                f"{cls.__name__}', ...) to drop the inherited keys.")
    raise ValueError(msg)


def check_budget(value: Any) -> Optional[float]:
    """Return ``factor_memory_budget_mb`` if it is ``None`` or ``> 0``.

    Raises:
        ValueError: Naming the field and the unit.
    """
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not float(value) > 0 or float(value) == float('inf')):
        raise ValueError(
            f'Invalid factor_memory_budget_mb={value!r}: a positive number of '
            'MiB (e.g. 1024 for 1 GiB) bounding the preconditioner factors, '
            'or None for no budget.')
    return float(value)
