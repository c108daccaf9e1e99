"""The generated protocol stubs and tritonclient's load into one interpreter in either order: a fresh
process each time, since an import clash only shows in a process that has imported neither yet. (The codec
itself: tests/unit/test_codec.py.)"""

from __future__ import annotations

import subprocess
import sys

from agent.protocol import oip_pb2
from tests.support.harness import REPO


def test_our_package_does_not_clash_with_tritonclient():
    assert oip_pb2.DESCRIPTOR.package == "sidewatch.oip"
    for order in ("import tritonclient.grpc; import agent.protocol.oip_pb2",
                  "import agent.protocol.oip_pb2; import tritonclient.grpc"):
        script = order + "; import agent.protocol.codec; print('ok')"
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO, check=False, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "ok"
