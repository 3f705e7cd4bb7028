"""The training terms besides SR and gSR: the adversarial losses (losses.py), LeCam (D's loss), DiffAugment (D's
inputs) and the EMA of G."""
from source.regularizers.diffaugment import DiffAugment, parse_policy
from source.regularizers.ema import GeneratorEMA
from source.regularizers.lecam import LeCam

__all__ = ["DiffAugment", "GeneratorEMA", "LeCam", "parse_policy"]
