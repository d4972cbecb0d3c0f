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
        'time' is a required property``. Also for a document too deeply nested for jsonschema
        (``RecursionError``) or one it cannot process at all: nothing else escapes.
    """
    try:
        kind = DocumentNames[name]
    except (KeyError, TypeError):
        raise DocumentError(f"unknown document name {str(name)[:40]!r}") from None
    if kind in (DocumentNames.bulk_datum, DocumentNames.bulk_events):
        raise DocumentError(f"deprecated document type {name!r} is not accepted")
    if not isinstance(doc, dict):
        raise DocumentError(f"{name} document must be a mapping, got {type(doc).__name__}")
    try:
        error = jsonschema.exceptions.best_match(schema_validators[kind].iter_errors(doc))
    except RecursionError:
        # jsonschema recurses into nested values; hostile nesting must not escape as a
        # RecursionError (documents from a socket pass check_structure's depth limit first).
        raise DocumentError(f"{name} document nests too deeply to validate") from None
    except Exception as exc:  # whatever jsonschema trips on in a hostile document
        raise DocumentError(
            f"{name} document could not be validated: {type(exc).__name__}: {str(exc)[:200]}"
        ) from exc
    if error is None:
        return
    where = _clip("/".join(str(p) for p in error.absolute_path) or "<document>", 200)
    uid = doc.get("uid")
    ident = f" (uid {_clip(uid, 80)!r})" if isinstance(uid, str) else ""
    # jsonschema quotes the offending value in its message: clip it, it may be a megabyte.
    raise DocumentError(
        f"invalid {name} document{ident}: at {where!r}: {_clip(error.message, 300)}"
    )


def _clip(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n] + "..."
