"""Schemathesis hooks of the api's contract test (tests/tests/api_contract.rs).

`GET /api/v1/nodes/{id}/wait` waits, by design, up to its `timeout` (60 s when absent, at most
300 s) for a node that may reach the status. Once schemathesis has found a real node's id, such
a call is a correct long wait, not a hang; keep the waits short so the run stays quick. Values
that are not a valid number of seconds are left as generated (they must be refused with 400).
"""

import schemathesis

LONGEST_WAIT_SECS = 1


@schemathesis.hook
def map_case(context, case):
    if case.operation.path.endswith("/wait"):
        query = dict(case.query or {})
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
            case.query = query
    return case
