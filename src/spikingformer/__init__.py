"""spikingformer: spike-driven transformers (Spikingformer, Spikformer) in PyTorch."""

__version__ = "0.1.0"

from spikingformer.neuron import LIFParams, MultiStepLIF, lif_reference, multistep_lif  # noqa: E402

__all__ = ["LIFParams", "MultiStepLIF", "lif_reference", "multistep_lif", "__version__"]
