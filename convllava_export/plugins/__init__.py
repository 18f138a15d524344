"""ConvLLaVA inside engines other teams already run: a vLLM model plugin and a TensorRT-LLM
(PyTorch backend) registration.

`common` is plain Python (no engine import): the folder's contract, the weight-name mapping from
the released layout, the token count per image and the official re-tokenization. `vllm` and
`trtllm` import their engine and are only imported by it (entry point / custom module dir).
"""
