"""``import samoyeds_vllm`` registers with Transformers lazily: cheap import, registered once Transformers loads."""

from __future__ import annotations

import subprocess
import sys

_SCRIPT = """
import sys
import samoyeds_vllm
assert "transformers" not in sys.modules, "import samoyeds_vllm must not import transformers"
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
assert AUTO_QUANTIZER_MAPPING["samoyeds"].__name__ == "SamoyedsHfQuantizer"
assert AUTO_QUANTIZATION_CONFIG_MAPPING["samoyeds"].__name__ == "SamoyedsConfig"
import samoyeds_vllm.hf as hf
assert hf.register() and hf.register()
print("ok")
"""


def test_import_is_lazy_and_registers_on_transformers_import() -> None:
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
