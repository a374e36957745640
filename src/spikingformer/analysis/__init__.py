"""What the paper's claims rest on: spike audit, synaptic operations and theoretical energy.

* :mod:`~spikingformer.analysis.audit` -- forward hooks that record what every convolution,
  linear layer and attention product receives (values, histograms, firing rates); the strict
  "is every input a spike?" check; the data behind the paper's Figures 3 and 4.
* :mod:`~spikingformer.analysis.geometry` -- operation counts per layer, from the shapes a forward
  pass of the model records (on the meta device for a config alone).
* :mod:`~spikingformer.analysis.energy` -- FLOPs, SOPs and energy per layer (paper Eq. 18-20,
  counted as the authors' code counts them), from a recording or from a config plus firing rates.
* :mod:`~spikingformer.analysis.compare` -- Spikingformer vs Spikformer on the same inputs.
* :mod:`~spikingformer.analysis.paper_rates` -- the authors' logged per-layer firing rates and totals.
* :mod:`~spikingformer.analysis.plots` -- PNG figures (matplotlib, Agg backend).
* :mod:`~spikingformer.analysis.commands` -- the ``audit``, ``energy`` and ``fuse`` sub-commands.
"""

from spikingformer import _lazy_exports

_AUDIT = ("InputStats", "SpikeRecord", "SpikeRecorder", "block_inputs", "documented_non_spike_layers",
          "non_spike_layers", "record_activity")
_ENERGY = ("E_AC_PJ", "E_MAC_PJ", "EnergyReport", "EnergyRow", "InputActivity", "energy_from_rates",
           "energy_from_record")
_GEOMETRY = ("layer_specs", "record_shapes")
_EXPORTS = {**dict.fromkeys(_AUDIT, "spikingformer.analysis.audit"),
            **dict.fromkeys(_ENERGY, "spikingformer.analysis.energy"),
            **dict.fromkeys(_GEOMETRY, "spikingformer.analysis.geometry")}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS)
