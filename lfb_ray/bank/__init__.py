"""Long-term feature bank: on-disk format, memory-mapped store and window sampling, mmaction2 interop."""

from lfb_ray.bank.format import FORMAT_VERSION, BankError
from lfb_ray.bank.interop import export_mmaction2, import_mmaction2
from lfb_ray.bank.reader import FeatureBank
from lfb_ray.bank.writer import BankPart, BankSummary, write_bank, write_bank_parts

__all__ = [
    "FORMAT_VERSION",
    "BankError",
    "BankPart",
    "BankSummary",
    "FeatureBank",
    "export_mmaction2",
    "import_mmaction2",
    "write_bank",
    "write_bank_parts",
]
