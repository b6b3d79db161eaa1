"""Hugging Face interop: ``megatron-lite convert to-hf | from-hf | verify``.

The name maps and per-tensor transforms live in :mod:`megatron_lite.checkpoint.hf`; this package
reads and writes the files (``io``), converts the tokenizer (``tokenizer``), checks the result
tensor by tensor (``compare``) and by logits (``verify``) and writes the model card (``card``).
"""

from megatron_lite.convert.from_hf import ImportResult, from_hf
from megatron_lite.convert.to_hf import ExportResult, to_hf
from megatron_lite.convert.verify import VerifyResult, verify

__all__ = ["ExportResult", "ImportResult", "VerifyResult", "from_hf", "to_hf", "verify"]
