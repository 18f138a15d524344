"""ConvLLaVA as a TensorRT-LLM (PyTorch backend) custom module: pass this directory to
`trtllm-serve FOLDER --custom_module_dirs DIR` (or `trtllm-bench` / `quickstart_multimodal.py`),
FOLDER being one written by `convllava-export export vllm`. In Python, `import
convllava_export.plugins.trtllm` before `tensorrt_llm.LLM(model=FOLDER)`.

Importing it registers `ConvLlavaForConditionalGeneration` (model and input processor) with
TensorRT-LLM; it needs TensorRT-LLM 1.2.x or 1.3.x (`trtllm_core.check_version`).

TensorRT-LLM imports a custom module dir as a top-level package (here `trtllm`, with the
parent `convllava_export/plugins` put on sys.path). The model is imported under its package
name, `convllava_export.plugins.trtllm.model`, so it registers once and worker processes can
import it by that name; the parent entry is then taken off sys.path again, so that `common` or
`vllm_model` do not become top-level module names for the rest of the process.
"""

import sys
from pathlib import Path

from convllava_export.plugins.trtllm import model  # noqa: F401  (registers)

if __name__ != "convllava_export.plugins.trtllm":  # imported from the directory, by trtllm-serve
    _parent = str(Path(__file__).resolve().parent.parent)
    sys.path[:] = [p for p in sys.path if p != _parent]
