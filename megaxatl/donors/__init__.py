"""Donor readers: any supported donor checkpoint -> one canonical, family-free donor state.

    from megaxatl.donors import open_donor
    donor = open_donor("path/to/hf_folder_or.gguf")
    donor.spec                  # DonorSpec: architecture facts
    for name in donor.keys():   # canonical names == parameter names of an all-attention megaxatl model
        t = donor.get(name)     # read this one tensor only (native dtype)
        donor.source(name)      # the original key, for the transfer report

Families (one key-map table each): `gpt_neox` (Pythia), `llama` / `mistral` / `qwen2`
(`llama.py`), `gpt2`. Formats: safetensors (single / sharded), `pytorch_model.bin` (single /
sharded, weights_only), GGUF (via transformers, dequantized at open).
Canonical names and shapes: `megaxatl.donors.spec`.
"""

from .donor import SUPPORTED_MODEL_TYPES, Donor, open_donor
from .spec import DonorError, DonorSpec, canonical_shapes

__all__ = ["open_donor", "Donor", "DonorSpec", "DonorError", "canonical_shapes", "SUPPORTED_MODEL_TYPES"]
