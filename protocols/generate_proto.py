"""Regenerates swarm_pb2.py from swarm.proto: ``python protocols/generate_proto.py`` (needs grpcio-tools).

hivemind's runtime.proto is registered in protobuf's descriptor pool as "runtime.proto", so we import it by that
name and then point the generated Python import at the module that registers it.
"""

from pathlib import Path

import hivemind
from grpc_tools import protoc

here = Path(__file__).parent
hivemind_proto = Path(hivemind.__file__).parent / "proto"
code = protoc.main(
    ["protoc", f"-I{here}", f"-I{hivemind_proto}", f"--python_out={here}", str(here / "swarm.proto")]
)
if code != 0:
    raise SystemExit(f"protoc failed with exit code {code}")
generated = here / "swarm_pb2.py"
text = generated.read_text()
text = text.replace(
    "import runtime_pb2 as runtime__pb2", "from hivemind.proto import runtime_pb2 as runtime__pb2"
)
generated.write_text(text)
