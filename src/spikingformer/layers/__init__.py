"""Building blocks shared by Spikingformer and Spikformer.

:mod:`~spikingformer.layers.blocks` holds the paper's blocks; :mod:`~spikingformer.layers.routes`
the faster or leaner computations of the same blocks, the switch that selects them
(``SPIKINGFORMER_ROUTES``) and their per-ISA limits; :mod:`~spikingformer.layers.bn_spike` the
blocks' BN -> SN [-> max-pool] by those routes; :mod:`~spikingformer.layers.token_linear` the token linears, whose
routes are ``token_linear`` and ``spike_linear``; :mod:`~spikingformer.layers.spike_conv` the tokenizer's
convolutions of spikes (route ``spike_conv``); :mod:`~spikingformer.layers.winograd` its dense 3x3
convolutions by Winograd's F(2x2, 3x3) (route ``winograd``).
"""

from spikingformer.layers import routes
from spikingformer.layers.blocks import (
    HEAD_KINDS,
    ClassificationHead,
    ConvBN,
    LIFFactory,
    ResidualStyle,
    SpikingMLP,
    SpikingSelfAttention,
    SpikingTokenizer,
    SpikingTransformerBlock,
    TokenConvBN,
    lif_factory,
    spike_attention,
)
from spikingformer.layers.bn_spike import bn_spike_pool
from spikingformer.layers.routes import ONEDNN_MIN_WEIGHTS, RECOMPUTE_MIN_ELEMENTS
from spikingformer.layers.token_linear import TokenLinear

# the names these helpers had when the routes lived in this module
from spikingformer.layers.bn_spike import bn_spike_pool_plain as _bn_spike_pool  # noqa: E402
from spikingformer.layers.bn_spike import max_pool as _max_pool  # noqa: E402
from spikingformer.layers.bn_spike import spike_maps as _spike_channels_last  # noqa: E402

__all__ = [
    "HEAD_KINDS", "ONEDNN_MIN_WEIGHTS", "RECOMPUTE_MIN_ELEMENTS", "ClassificationHead", "ConvBN", "LIFFactory",
    "ResidualStyle", "SpikingMLP", "SpikingSelfAttention", "SpikingTokenizer", "SpikingTransformerBlock",
    "TokenConvBN", "TokenLinear", "bn_spike_pool", "lif_factory", "routes", "spike_attention",
]

