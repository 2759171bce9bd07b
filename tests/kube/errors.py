"""API errors as the Kubernetes API server reports them: ``Status`` objects.

Every failure the emulator returns is a ``v1 Status`` with ``status: Failure``, a ``reason`` and
``code`` from the same table the API server uses, and ``details`` naming the object.
Source: k8s.io/apimachinery/pkg/api/errors/errors.go (NewNotFound, NewConflict, NewInvalid...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONFLICT_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


@dataclass
class FieldError:
    """One entry of a field.ErrorList: ``type`` is the cause reason (FieldValueRequired...)."""

    type: str
    field: str
    detail: str = ""
    value: Any = None
    has_value: bool = False

    _TYPE_TEXT = {
        "FieldValueRequired": "Required value",
        "FieldValueInvalid": "Invalid value",
        "FieldValueTypeInvalid": "Invalid value",
        "FieldValueNotSupported": "Unsupported value",
        "FieldValueDuplicate": "Duplicate value",
        "FieldValueForbidden": "Forbidden",
        "FieldValueTooLong": "Too long",
        "FieldValueTooMany": "Too many",
        "FieldValueNotFound": "Not found",
    }

    def body(self) -> str:
        """The text after ``field:`` (field.Error.ErrorBody)."""
        text = self._TYPE_TEXT.get(self.type, self.type)
        if self.has_value:
            text = f"{text}: {go_repr(self.value)}"
        if self.detail:
            text = f"{text}: {self.detail}"
        return text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}" if self.field else self.body()


def go_repr(v: Any) -> str:
    """Print a value as Go's field errors do: strings quoted, numbers and bools bare."""
    if type(v) is str:
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, int | float):
        return str(v)
    return str(v)


@dataclass
class ApiError(Exception):
    """An error response; ``status()`` renders the Status body."""

    code: int
    reason: str
    message: str
    details: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"

    def status(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            body["details"] = self.details
        if not self.reason:
            del body["reason"]
        return body


def qualified(resource: str, group: str) -> str:
    """``plural.group`` as errors print a GroupResource (just ``plural`` for the core group)."""
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        404,
        "NotFound",
        f'{qualified(resource, group)} "{name}" not found',
        {"name": name, "group": group, "kind": resource},
    )


def not_found_path() -> ApiError:
    """404 for a URL no resource serves (as the API server's router answers)."""
    return ApiError(
        404, "NotFound", "the server could not find the requested resource", {"causes": []}
    )


def already_exists(resource: str, group: str, name: str) -> ApiError:
    return ApiError(
        409,
        "AlreadyExists",
        f'{qualified(resource, group)} "{name}" already exists',
        {"name": name, "group": group, "kind": resource},
    )


def conflict(resource: str, group: str, name: str, why: str = CONFLICT_MESSAGE) -> ApiError:
    return ApiError(
        409,
        "Conflict",
        f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": {why}',
        {"name": name, "group": group, "kind": resource},
    )


def invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> ApiError:
    """422 Invalid with one cause per field error (errors.NewInvalid)."""
    gk = f"{kind}.{group}" if group else kind
    text = str(errors[0]) if len(errors) == 1 else "[" + ", ".join(str(e) for e in errors) + "]"
    causes = [{"reason": e.type, "message": e.body(), "field": e.field} for e in errors]
    return ApiError(
        422,
        "Invalid",
        f'{gk} "{name}" is invalid: {text}',
        {"name": name, "group": group, "kind": kind, "causes": causes},
    )


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def method_not_allowed() -> ApiError:
    return ApiError(
        405, "MethodNotAllowed", "the server does not allow this method on the requested resource"
    )


def unsupported_media_type(content_type: str, accepted: list[str]) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the body of the request was in an unknown format - accepted media types include: "
        f"{', '.join(accepted)}",
    )


def forbidden(resource: str, group: str, name: str, why: str) -> ApiError:
    return ApiError(
        403,
        "Forbidden",
        f'{qualified(resource, group)} "{name}" is forbidden: {why}',
        {"name": name, "group": group, "kind": resource},
    )


def patch_rejected(message: str) -> ApiError:
    """422 for a patch that cannot be applied (errors.NewGenericServerResponse(422, ...))."""
    return ApiError(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
        {"causes": [{"reason": "UnexpectedServerResponse", "message": message}]},
    )


def internal(message: str) -> ApiError:
    return ApiError(
        500,
        "InternalError",
        f"Internal error occurred: {message}",
        {"causes": [{"message": message}]},
    )


def gone(message: str) -> ApiError:
    return ApiError(410, "Expired", message)
