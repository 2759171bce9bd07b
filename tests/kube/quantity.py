"""Kubernetes resource quantities: parse and print in canonical form, as the API server stores them.

The API server decodes every ``resource.Quantity`` field (Node ``status.capacity`` and
``status.allocatable``, container ``resources``) and writes it back canonically, so a client that
writes ``"1000"`` reads back ``"1k"`` and ``"2048Mi"`` reads back ``"2Gi"``.
Source: k8s.io/apimachinery/pkg/api/resource/quantity.go (ParseQuantity, CanonicalizeBytes).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_RE = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)$")
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_DECIMAL_BY_EXP = {v: k for k, v in _DECIMAL.items()}
_BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_BINARY_BY_EXP = {v: k for k, v in _BINARY.items()}
_EXP = re.compile(r"^[eE]([+-]?[0-9]+)$")

QUANTITY_ERROR = (
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)


class QuantityError(ValueError):
    """The text is not a Kubernetes quantity (message as the API server words it)."""


def parse(value: object) -> tuple[Fraction, str]:
    """Parse a quantity (string, int or float) into ``(value, format)``.

    ``format`` is ``"DecimalSI"``, ``"BinarySI"`` or ``"DecimalExponent"``.
    Raises QuantityError for anything else.
    """
    if isinstance(value, bool):
        raise QuantityError(QUANTITY_ERROR)
    if isinstance(value, int):
        return Fraction(value), "DecimalSI"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise QuantityError(QUANTITY_ERROR)
        return Fraction(repr(value)), "DecimalSI"
    if not isinstance(value, str):
        raise QuantityError(QUANTITY_ERROR)
    m = _RE.match(value.strip())
    if not m:
        raise QuantityError(QUANTITY_ERROR)
    number = Fraction(m.group(1))
    suffix = m.group(2)
    if suffix in _DECIMAL:
        return number * Fraction(10) ** _DECIMAL[suffix], "DecimalSI"
    if suffix in _BINARY:
        return number * 2 ** _BINARY[suffix], "BinarySI"
    e = _EXP.match(suffix)
    if e:
        return number * Fraction(10) ** int(e.group(1)), "DecimalExponent"
    raise QuantityError(QUANTITY_ERROR)


def _round_up_nano(v: Fraction) -> Fraction:
    scaled = v * 10**9
    if scaled.denominator == 1:
        return v
    return Fraction(math.ceil(scaled), 10**9)


def canonical(value: object) -> str:
    """Return the canonical string the API server stores for quantity ``value``.

    Examples: ``1000 -> "1k"``, ``"1500" -> "1500"``, ``"0.5" -> "500m"``,
    ``"2048Mi" -> "2Gi"``, ``"1e3" -> "1e3"``. Raises QuantityError on bad input.
    """
    v, fmt = parse(value)
    if v == 0:
        return "0"
    if fmt == "BinarySI":
        if -1024 < v < 1024 or v.denominator != 1:
            fmt = "DecimalSI"
        else:
            n = int(v)
            exp = 0
            while exp < 60 and n % 1024 == 0:
                n //= 1024
                exp += 10
            return f"{n}{_BINARY_BY_EXP.get(exp, '')}" if exp else str(n)
    v = _round_up_nano(v)
    # mantissa * 10**exp with exp a multiple of 3 in [-9, 18], mantissa integral, exp largest
    exp = -9
    mantissa = v * 10**9
    while exp < 18:
        nxt = mantissa / 1000
        if nxt.denominator != 1:
            break
        mantissa = nxt
        exp += 3
    m = int(mantissa)
    if fmt == "DecimalExponent":
        return f"{m}e{exp}" if exp else str(m)
    return f"{m}{_DECIMAL_BY_EXP[exp]}"
