"""The API server listens on a fixed port, 127.0.0.1:8765, like many apps' dev servers.

test_status_endpoint and test_version_endpoint each hold that port for about a second while a
client talks to them. Under ``pytest -n 2`` they are the first test of each worker (xdist hands
tests 1-2 to one worker and 3-4 to the other), so they run at the same moment: without jails the
second bind fails with "Address already in use" (or its client talks to the other test's server).
Each jail has its own network namespace, hence its own 127.0.0.1:8765.

The server is started in the test body, not in a fixture: fixtures run outside the jail.
"""

import time

import myapp


def talk_for_a_second(port, path):
    replies = []
    for _ in range(10):
        replies.append(myapp.get_json(port, path))
        time.sleep(0.1)
    return replies


def test_status_endpoint():
    with myapp.running_server() as port:
        replies = talk_for_a_second(port, "/status")
    assert all(reply["ok"] for reply in replies)
    assert replies[0]["instance"] == "myapp@jail"


def test_instance_name_uses_hostname():
    # Dashboards group instances by this name. Without a jail it is whatever this machine is
    # called; in a jail the hostname is always "jail", so the expectation is deterministic.
    assert myapp.instance_name() == "myapp@jail"


def test_version_endpoint():
    with myapp.running_server() as port:
        replies = talk_for_a_second(port, "/version")
    assert {reply["version"] for reply in replies} == {myapp.__version__}
