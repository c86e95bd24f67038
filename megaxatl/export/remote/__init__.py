"""The code an exported remote-code folder ships: copied verbatim next to its weights.

The files import only torch and transformers (never megaxatl), so the folder loads anywhere with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`.
"""

from pathlib import Path

FILES = ("configuration_megaxatl.py", "layers_megaxatl.py", "modeling_megaxatl.py")


def template_dir() -> Path:
    return Path(__file__).parent
