"""Schemathesis hooks of the api's contract test (tests/tests/api_contract.rs): they make the
generated requests follow the rules of use a JSON schema cannot say, and nothing else.

- `GET /api/v1/nodes/{id}/wait` waits, by design, up to its `timeout` (60 s when absent, at
  most 300 s) for a node that may reach the status. Once schemathesis has found a real node's
  id, such a call is a correct long wait, not a hang; keep the waits short so the run stays
  quick. Values that are not a valid number of seconds are left as generated (they must be
  refused with 400).
- An `Idempotency-Key` names one request: a client sends a new key with each new request. A
  valid generated key is made unique; a malformed one is left (it must be refused with 400).
- A `cursor` is opaque: a client passes back only a `next_cursor` the api gave. A generated one
  that is not of that shape is dropped (a real one, followed through a link, is kept).
"""

import base64
import json
import uuid

import schemathesis

LONGEST_WAIT_SECS = 1


def _one_of_ours(cursor):
    if not isinstance(cursor, str) or not cursor:
        return False
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(decoded, dict) and {"created_at", "subscription_id", "ordinal"} <= set(
        decoded
    )


@schemathesis.hook
def map_case(context, case):
    query = dict(case.query or {})
    if case.operation.path.endswith("/wait"):
        timeout = query.get("timeout")
        wait = None
        if timeout is None:
            wait = LONGEST_WAIT_SECS
        elif isinstance(timeout, int) and not isinstance(timeout, bool):
            wait = min(timeout, LONGEST_WAIT_SECS) if timeout >= 0 else None
        elif isinstance(timeout, str) and timeout.isdigit():
            wait = min(int(timeout), LONGEST_WAIT_SECS)
        if wait is not None:
            query["timeout"] = wait
    if "cursor" in query and not _one_of_ours(query["cursor"]):
        del query["cursor"]
    case.query = query
    headers = dict(case.headers or {})
    for name in list(headers):
        key = headers[name]
        if (
            name.lower() == "idempotency-key"
            and isinstance(key, str)
            and 1 <= len(key) <= 255
            and key.isprintable()
            and key.isascii()
        ):
            headers[name] = str(uuid.uuid4())
    case.headers = headers
    return case
