"""Per-document validation against event-model's JSON schemas, with errors that name the problem."""

from __future__ import annotations

import jsonschema
from event_model import DocumentNames, schema_validators

from apt_stream.errors import DocumentError


def validate_document(name: str, doc: dict) -> None:
    """Check one document against its event-model schema.

    Raises
    ------
    DocumentError
        Naming the document type, its uid when it has one, the JSON path of the offending field
        and the schema's complaint, e.g. ``invalid start document (uid 'a1b2'): at 'time':
        'time' is a required property``.
    """
    try:
        kind = DocumentNames[name]
    except KeyError:
        raise DocumentError(f"unknown document name {name!r}") from None
    if kind in (DocumentNames.bulk_datum, DocumentNames.bulk_events):
        raise DocumentError(f"deprecated document type {name!r} is not accepted")
    if not isinstance(doc, dict):
        raise DocumentError(f"{name} document must be a mapping, got {type(doc).__name__}")
    error = jsonschema.exceptions.best_match(schema_validators[kind].iter_errors(doc))
    if error is None:
        return
    where = "/".join(str(p) for p in error.absolute_path) or "<document>"
    uid = doc.get("uid")
    ident = f" (uid {uid!r})" if isinstance(uid, str) else ""
    raise DocumentError(f"invalid {name} document{ident}: at {where!r}: {error.message}")
