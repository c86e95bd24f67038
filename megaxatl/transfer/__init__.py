"""XATL: copy a donor transformer's shared components into an LCI model (see plan.py)."""

from megaxatl.transfer.api import from_donor, model_dict_from_donor, write_transfer
from megaxatl.transfer.plan import TransferError, default_layer_map
from megaxatl.transfer.report import TransferReport

__all__ = ["TransferError", "TransferReport", "default_layer_map", "from_donor", "model_dict_from_donor", "write_transfer"]
