"""Step 4, swap: the planned convolutions of a network become decomposed modules (`surgery`, with the
blocks' inference `forms`), and an original state dict the compressed one (`convert`)."""

from .convert import RefitData, convert_state_dict, converted_shapes
from .surgery import swap_modules

__all__ = ["RefitData", "convert_state_dict", "converted_shapes", "swap_modules"]
