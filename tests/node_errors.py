"""Checks on the errors users see: a failed node's message names that node, says what is wrong and how to fix it."""
from __future__ import annotations


def node_error_message(run, node_type: str) -> str:
    """The message of the node that failed the run; it must be `node_type` (not ComfyUI's '<node>Clone' copy)."""
    assert not run.success
    error = run.error
    assert error is not None and error["event"] == "execution_error", run.node_errors or run.validation_error
    assert error["node_type"] == node_type, error
    message = error["exception_message"]
    assert message.startswith(node_type) and "How to fix:" in message, message
    return message


def assert_node_error(run, node_type: str, *fragments: str) -> None:
    message = node_error_message(run, node_type)
    for fragment in fragments:
        assert fragment in message, message

