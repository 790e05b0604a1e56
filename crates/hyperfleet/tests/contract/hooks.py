"""Schemathesis hooks for the contract test (tests/contract.rs): keep what generated requests do to the host
small, without narrowing what they test. Each hook edits a case just before it is sent; schemathesis then
re-checks the edited case against the schema, so a negative case that an edit made valid counts as positive."""

import os
import posixpath

import schemathesis

# The running machine the test starts: exec and file requests go to it, so that they reach the guest agent
# instead of stopping at a 404. Every other operation is kept off it (schemathesis reuses ids it has seen in
# responses), so that it stays running.
MACHINE = "contract"
MACHINE_ID = os.environ["HYPERFLEET_CONTRACT_MACHINE_ID"]
# The key the test runs with: revoking it would turn every later request into a 401.
OWN_KEY_ID = os.environ["HYPERFLEET_CONTRACT_KEY_ID"]
# The guest directory every generated file path is put under (made absolute, `..` resolved), so that file
# requests reach the agent, and an upload or a recursive delete cannot break the guest.
GUEST_DIR = "/tmp/contract"
MAX_MEM_MIB = 64
MAX_EXEC_SECS = 3
# A long-poll that waits its full 30 s default eats the run's time budget, and the operations scheduled after
# it (exec, files) would then go untested.
MAX_WAIT_SECS = 2


@schemathesis.hook
def before_call(ctx, case, kwargs):
    method, path = case.operation.method.upper(), case.operation.path
    # The event stream follows forever; the contract is checked on its finite form (the stored backlog).
    if path == "/events":
        case.query = dict(case.query or {}, follow="false")
    if method == "DELETE" and path == "/api-keys/{id}" and (case.path_parameters or {}).get("id") == OWN_KEY_ID:
        case.path_parameters["id"] = "key_not_the_test_key"
    body = case.body if isinstance(case.body, dict) else None
    if method == "POST" and path == "/machines" and body is not None:
        mem = body.get("mem_size_mib")
        if isinstance(mem, int) and not isinstance(mem, bool) and mem > MAX_MEM_MIB:
            body["mem_size_mib"] = MAX_MEM_MIB
        # Generated commands in a started machine must not reach anything off this host.
        body["network"] = {"egress": "deny"}
    if path.startswith("/machines/{id}/exec") and body is not None:
        secs = body.get("timeout")
        if isinstance(secs, int) and not isinstance(secs, bool) and MAX_EXEC_SECS < secs <= 3600:
            body["timeout"] = MAX_EXEC_SECS
    if path == "/machines/{id}/wait":
        query = case.query if isinstance(case.query, dict) else {}
        secs = query.get("timeout")
        if secs is None or (isinstance(secs, (int, str)) and str(secs).isdigit() and int(secs) > MAX_WAIT_SECS):
            case.query = dict(query, timeout=MAX_WAIT_SECS)
    if path.startswith("/machines/{id}") and case.path_parameters:
        if path.startswith(("/machines/{id}/exec", "/machines/{id}/files")):
            case.path_parameters["id"] = MACHINE
        elif case.path_parameters.get("id") in (MACHINE, MACHINE_ID):
            case.path_parameters["id"] = "not-the-contract-machine"
    if path.startswith("/machines/{id}/files"):
        for params in (case.query, body):
            p = (params or {}).get("path")
            if isinstance(p, str):
                inside = posixpath.normpath(posixpath.join(GUEST_DIR, p.lstrip("/")))
                params["path"] = inside if inside.startswith(GUEST_DIR + "/") else GUEST_DIR + "/file"
