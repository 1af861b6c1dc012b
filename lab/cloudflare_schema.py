"""Validate Cloudflare API v4 requests and responses against Cloudflare's OpenAPI schema.

The schema is Cloudflare's published OpenAPI 3.0.3 document (repository
cloudflare/api-schemas, commit 451b09a2 of 2024-08-06) cut down to the operations cfheal
calls. A copy lives in ``lab/cloudflare/openapi-subset.json`` with its BSD 3-Clause license.

Validation uses openapi-core 0.23. The published document has defects that make correct
traffic fail validation, so ``CloudflareSchema.load()`` validates against a corrected copy
made in memory, and ``corrections`` lists each change. ``load(correct_defects=False)`` uses
the document exactly as published. The file on disk is never changed. The corrections:

- For most operations the ``4XX`` response schema is ``allOf`` the success envelope
  (``success: true``, ``result`` not null) and the failure envelope (``success: false``,
  ``result: null``), which no body can satisfy. The correction keeps only the failure
  envelope. It is applied only where the published schema rejects a plain Cloudflare error
  envelope that the failure envelope accepts.
- Many operations list ``api_email``, ``api_key`` and ``api_token`` in one security
  requirement, which demands all three at once. The correction splits it into the two
  alternatives that the other operations declare: ``api_token``, or ``api_email`` with
  ``api_key``.
- Several identifier path parameters reference components marked ``readOnly``. OpenAPI
  3.0.3 gives readOnly a meaning only for object properties, but openapi-core applies it to
  the parameter value and rejects every request. The correction inlines those parameter
  schemas without the flag.

openapi-spec-validator also rejects the document itself, because one ``default`` does not
match its type (``load-balancing_session_affinity_attributes.headers`` has the default
``"none"`` but the type array). openapi-core would refuse to load the document for that, so
the check runs here on its own and its findings are kept in ``document_errors``. Requests and
responses are then validated without the check.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from jsonschema_path import SchemaPath
from openapi_core import Config, OpenAPI
from openapi_core.datatypes import RequestParameters
from openapi_core.validation.request.exceptions import ParameterValidationError
from openapi_core.validation.schemas.exceptions import InvalidSchemaValue
from openapi_schema_validator import OAS30ReadValidator
from openapi_spec_validator import OpenAPIV30SpecValidator
from referencing import Registry
from referencing.jsonschema import DRAFT4
from werkzeug.datastructures import Headers, ImmutableMultiDict

DEFAULT_SCHEMA_PATH = Path(__file__).resolve().parent / "cloudflare" / "openapi-subset.json"

# Every operation path in the schema is relative to this prefix of the base URL.
API_PATH_PREFIX = "/client/v4"

# A plain Cloudflare error envelope, used to find 4XX schemas that reject every error body.
_PLAIN_ERROR_ENVELOPE = {
    "success": False,
    "errors": [{"code": 10000, "message": "Authentication error"}],
    "messages": [],
    "result": None,
}
_FAILURE_COMPONENT = re.compile(r"^#/components/schemas/[\w.-]*api-response-common-failure$")
_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
_DOCUMENT_URI = "urn:cloudflare-openapi-subset"


class SchemaValidationError(AssertionError):
    """A request or response that does not match the Cloudflare schema.

    The message names the request, the operation, the part that failed and each schema
    failure. ``failures`` contains the same failures as a list of strings. It subclasses
    AssertionError so that pytest reports it as a failed check.
    """

    def __init__(
        self,
        *,
        method: str,
        path: str,
        part: str,
        failures: list[str],
        operation: Operation | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.part = part
        self.failures = failures
        self.operation = operation
        if operation is None:
            where = f"{method} {path}"
        else:
            where = f"{method} {path} (operation {operation.operation_id}, {operation.method} {operation.path_template})"
        super().__init__(f"{where}: {part} does not match the Cloudflare schema: " + "; ".join(failures))


class OperationNotFoundError(SchemaValidationError):
    """A method and path that no operation in the schema describes."""


@dataclass(frozen=True)
class Operation:
    """One operation of the schema: method, path template and operationId."""

    method: str
    path_template: str
    operation_id: str


@dataclass(frozen=True)
class SchemaCorrection:
    """One change that ``CloudflareSchema`` made to its in-memory copy of the schema."""

    operation: Operation
    location: str
    reason: str


class CloudflareSchema:
    """Cloudflare's OpenAPI schema, ready to validate requests and responses.

    Paths may be given with or without the ``/client/v4`` prefix and may carry a query
    string. The validation ignores the host, because the schema's server is
    api.cloudflare.com and the stand-in listens on loopback.
    """

    def __init__(self, document: Mapping[str, Any], *, source: str, correct_defects: bool = True) -> None:
        self.source = source
        self.published_document = document
        self.document_errors = _check_document(document)
        if correct_defects:
            self.document, self.corrections = _correct_defects(document)
        else:
            self.document, self.corrections = copy.deepcopy(dict(document)), []
        self._server_url = self.document["servers"][0]["url"].rstrip("/")
        # The document check ran above. openapi-core would repeat it and refuse the document.
        self._openapi = OpenAPI.from_dict(self.document, config=Config(spec_validator_cls=None))
        self._operations = _list_operations(self.document)

    @classmethod
    def load(cls, path: str | Path | None = None, *, correct_defects: bool = True) -> CloudflareSchema:
        """Load the schema from ``path``, by default the copy in ``lab/cloudflare/``."""
        schema_path = Path(path) if path is not None else DEFAULT_SCHEMA_PATH
        try:
            document = json.loads(schema_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"Cloudflare OpenAPI schema not found at {schema_path}. Pass the path of openapi-subset.json.") from None
        return cls(document, source=str(schema_path), correct_defects=correct_defects)

    @property
    def operations(self) -> list[Operation]:
        return [operation for operation, _ in self._operations]

    def find_operation(self, method: str, path: str) -> Operation:
        """Return the operation for ``method`` and ``path``, or raise OperationNotFoundError."""
        api_path, _ = _split_api_path(path)
        method_upper = method.upper()
        for operation, pattern in self._operations:
            if operation.method == method_upper and pattern.fullmatch(api_path):
                return operation
        raise OperationNotFoundError(
            method=method_upper,
            path=api_path,
            part="request",
            failures=["no operation in the schema has this method and path"],
        )

    def validate_request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | Iterable[tuple[str, str]] | str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes | str | Mapping[str, Any] | list[Any] | None = None,
        content_type: str | None = None,
    ) -> Operation:
        """Validate the security, parameters and body of a request, and return its operation.

        ``body`` may be raw bytes or text, or an object that is encoded as JSON. Raises
        SchemaValidationError with every failure found.
        """
        operation = self.find_operation(method, path)
        request = self._request(method, path, query, headers, body, content_type)
        failures = [_describe_error(error) for error in self._openapi.iter_apicall_request_errors(request)]
        if failures:
            raise SchemaValidationError(
                method=operation.method, path=request.api_path, part="request", failures=failures, operation=operation
            )
        return operation

    def validate_response(
        self,
        method: str,
        path: str,
        *,
        status: int,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes | str | Mapping[str, Any] | list[Any] | None = None,
        content_type: str | None = None,
    ) -> Operation:
        """Validate the status, content type and body of a response, and return its operation.

        The status must be documented for the operation: 200 or 201 and the 4XX range in
        this schema, so a 5XX response always fails. Raises SchemaValidationError.
        """
        operation = self.find_operation(method, path)
        request = self._request(method, path, None, None, None, None)
        response = _Response(status, headers, body, content_type)
        failures = [_describe_error(error) for error in self._openapi.iter_apicall_response_errors(request, response)]
        if failures:
            raise SchemaValidationError(
                method=operation.method,
                path=request.api_path,
                part=f"response {status}",
                failures=failures,
                operation=operation,
            )
        return operation

    def _request(self, method, path, query, headers, body, content_type) -> _Request:
        api_path, query_in_path = _split_api_path(path)
        pairs = list(query_in_path)
        pairs.extend(_query_pairs(query))
        return _Request(
            host_url=_origin_of(self._server_url),
            server_path=urlsplit(self._server_url).path,
            api_path=api_path,
            method=method,
            query=pairs,
            headers=headers,
            body=body,
            content_type=content_type,
        )


class _Request:
    """A request in the shape that openapi-core's Request protocol expects."""

    def __init__(self, *, host_url, server_path, api_path, method, query, headers, body, content_type) -> None:
        self.host_url = host_url
        self.api_path = api_path
        self.path = server_path + api_path
        self.method = method.lower()
        header_values = Headers(_header_pairs(headers))
        self.body = _body_bytes(body)
        if content_type is None:
            content_type = header_values.get("Content-Type", "application/json")
        self.content_type = content_type.lower()
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(query),
            header=header_values,
            cookie=ImmutableMultiDict(),
            path={},
        )


class _Response:
    """A response in the shape that openapi-core's Response protocol expects."""

    def __init__(self, status, headers, body, content_type) -> None:
        self.status_code = status
        self.headers = Headers(_header_pairs(headers))
        self.data = _body_bytes(body)
        if content_type is None:
            content_type = self.headers.get("Content-Type", "application/json")
        self.content_type = content_type.lower()


def _check_document(document: Mapping[str, Any]) -> list[str]:
    validator = OpenAPIV30SpecValidator(SchemaPath.from_dict(dict(document)))
    errors = []
    for error in validator.iter_errors():
        errors.append(f"{error.message} (schema: {_format_schema(getattr(error, 'schema', None))})")
    return errors


def _format_schema(schema: Any) -> str:
    text = json.dumps(schema, sort_keys=True, default=str)
    return text if len(text) <= 200 else text[:200] + "..."


def _list_operations(document: Mapping[str, Any]) -> list[tuple[Operation, re.Pattern[str]]]:
    operations = []
    for path_template, path_item in document["paths"].items():
        pattern = re.compile(re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(path_template)))
        for method, operation in path_item.items():
            if method not in _HTTP_METHODS:
                continue
            operations.append((Operation(method.upper(), path_template, operation.get("operationId", "")), pattern))
    # A literal segment must win over a template parameter, so fewer parameters come first.
    operations.sort(key=lambda item: item[0].path_template.count("{"))
    return operations


def _correct_defects(document: Mapping[str, Any]) -> tuple[dict[str, Any], list[SchemaCorrection]]:
    corrected = copy.deepcopy(dict(document))
    registry = Registry().with_resource(_DOCUMENT_URI, DRAFT4.create_resource(document))
    corrections = []
    for path_template, path_item in corrected["paths"].items():
        for method, operation_spec in path_item.items():
            if method not in _HTTP_METHODS:
                continue
            operation = Operation(method.upper(), path_template, operation_spec.get("operationId", ""))
            found = [
                _correct_error_envelope(operation, operation_spec, registry),
                _correct_security(operation, operation_spec),
                *_correct_read_only_parameters(operation, operation_spec.get("parameters", []), corrected),
                *_correct_read_only_parameters(operation, path_item.get("parameters", []), corrected),
            ]
            corrections.extend(correction for correction in found if correction is not None)
    return corrected, corrections


def _correct_error_envelope(operation: Operation, operation_spec: dict, registry: Registry) -> SchemaCorrection | None:
    media = operation_spec.get("responses", {}).get("4XX", {}).get("content", {}).get("application/json")
    if media is None:
        return None
    schema = media["schema"]
    failure_refs = [member for member in schema.get("allOf", []) if _FAILURE_COMPONENT.match(member.get("$ref", ""))]
    if len(failure_refs) != 1:
        return None
    failure_ref = failure_refs[0]
    if _accepts(schema, registry) or not _accepts(failure_ref, registry):
        return None
    media["schema"] = dict(failure_ref)
    return SchemaCorrection(
        operation=operation,
        location="responses/4XX",
        reason=f"allOf of the success envelope and {failure_ref['$ref']} rejects every error body; kept only the failure envelope",
    )


def _accepts(schema: Mapping[str, Any], registry: Registry) -> bool:
    validator = OAS30ReadValidator(_root_refs(schema), registry=registry)
    return validator.is_valid(_PLAIN_ERROR_ENVELOPE)


def _root_refs(node: Any) -> Any:
    """Copy a schema fragment with its local "#/..." references made absolute.

    The registry contains the whole document under _DOCUMENT_URI, so an absolute reference
    resolves there, and the references inside the document then resolve against it.
    """
    if isinstance(node, dict):
        rooted = {}
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#"):
                rooted[key] = _DOCUMENT_URI + value
            else:
                rooted[key] = _root_refs(value)
        return rooted
    if isinstance(node, list):
        return [_root_refs(item) for item in node]
    return node


def _correct_security(operation: Operation, operation_spec: dict) -> SchemaCorrection | None:
    requirements = operation_spec.get("security")
    if not requirements:
        return None
    combined = [requirement for requirement in requirements if {"api_token", "api_email", "api_key"} <= set(requirement)]
    if not combined:
        return None
    split = [requirement for requirement in requirements if requirement not in combined]
    for alternative in ({"api_token": []}, {"api_email": [], "api_key": []}):
        if alternative not in split:
            split.append(alternative)
    operation_spec["security"] = split
    return SchemaCorrection(
        operation=operation,
        location="security",
        reason="one requirement demanded api_email, api_key and api_token together; split into api_token, or api_email with api_key",
    )


def _correct_read_only_parameters(operation: Operation, parameters: list[dict], document: dict) -> list[SchemaCorrection]:
    """Inline parameter schemas that are marked readOnly, without the readOnly flag.

    OpenAPI 3.0.3 gives readOnly a meaning only for object properties, but openapi-core
    0.23 applies it to a parameter's own schema and rejects every value as "Tried to write
    read-only property". Several identifier parameters here reference such components.
    """
    corrections = []
    for parameter in parameters:
        schema = _resolve(parameter.get("schema", {}), document)
        if not schema.get("readOnly"):
            continue
        reference = parameter["schema"].get("$ref", "inline schema")
        parameter["schema"] = {key: value for key, value in schema.items() if key != "readOnly"}
        corrections.append(
            SchemaCorrection(
                operation=operation,
                location=f"parameters/{parameter.get('in')}/{parameter.get('name')}",
                reason=f"{reference} is readOnly, which openapi-core applies to the parameter value; inlined without readOnly",
            )
        )
    return corrections


def _resolve(schema: dict, document: dict) -> dict:
    seen = set()
    while "$ref" in schema and schema["$ref"].startswith("#/") and schema["$ref"] not in seen:
        seen.add(schema["$ref"])
        node: Any = document
        for part in schema["$ref"][2:].split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        schema = node
    return schema


def _split_api_path(path: str) -> tuple[str, list[tuple[str, str]]]:
    parts = urlsplit(path)
    api_path = parts.path or "/"
    if api_path.startswith(API_PATH_PREFIX + "/"):
        api_path = api_path[len(API_PATH_PREFIX) :]
    if len(api_path) > 1:
        api_path = api_path.rstrip("/")
    return api_path, parse_qsl(parts.query, keep_blank_values=True)


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _query_pairs(query: Mapping[str, Any] | Iterable[tuple[str, str]] | str | None) -> list[tuple[str, str]]:
    if query is None:
        return []
    if isinstance(query, str):
        return parse_qsl(query.lstrip("?"), keep_blank_values=True)
    if isinstance(query, Mapping):
        pairs = []
        for name, value in query.items():
            values = value if isinstance(value, (list, tuple)) else [value]
            pairs.extend((name, str(item)) for item in values)
        return pairs
    return [(name, str(value)) for name, value in query]


def _header_pairs(headers: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> list[tuple[str, str]]:
    if headers is None:
        return []
    if isinstance(headers, Mapping):
        return list(headers.items())
    return list(headers)


def _body_bytes(body: bytes | str | Mapping[str, Any] | list[Any] | None) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body or None
    if isinstance(body, str):
        return body.encode("utf-8")
    return json.dumps(body).encode("utf-8")


def _describe_error(error: BaseException) -> str:
    """Describe an openapi-core error, with each JSON Schema failure and its location."""
    schema_errors = _schema_errors_of(error)
    if schema_errors:
        # A parameter error names the parameter. Other errors print their whole cause, value
        # included, so the class name is shorter and the schema failures follow.
        summary = str(error) if isinstance(error, ParameterValidationError) else type(error).__name__
        return f"{summary}: " + ", ".join(_describe_schema_error(schema_error) for schema_error in schema_errors)
    summary = str(error)
    cause = error.__cause__
    if cause is not None and summary == f"{type(error).__name__}: {cause}":
        summary = type(error).__name__
    if cause is not None and str(cause) not in summary:
        return f"{summary}: {cause}"
    return summary or type(error).__name__


def _schema_errors_of(error: BaseException) -> list[Any]:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, InvalidSchemaValue):
            return list(cause.schema_errors)
        cause = cause.__cause__
    return []


def _describe_schema_error(schema_error: Any) -> str:
    location = "/".join(str(part) for part in getattr(schema_error, "absolute_path", [])) or "(root)"
    text = f"at {location}: {getattr(schema_error, 'message', schema_error)}"
    context = getattr(schema_error, "context", None) or []
    if context:
        # anyOf and oneOf failures keep the reason of each alternative in their context.
        reasons = sorted({f"{'/'.join(str(part) for part in item.absolute_path) or '(root)'}: {item.message}" for item in context})
        text += " [" + "; ".join(reasons[:4]) + (" ..." if len(reasons) > 4 else "") + "]"
    return text
