"""Benchmarks behind ``spikingformer bench`` and ``benchmarks/*.py``.

* :mod:`~spikingformer.benchmarking.lif`: the multi-step LIF neuron, every backend vs SpikingJelly;
* :mod:`~spikingformer.benchmarking.model`: training step and inference batch of the paper's models,
  this project's neurons vs SpikingJelly's, each configuration in a fresh process;
* :mod:`~spikingformer.benchmarking.scaling`: training-step time and memory vs T, batch, resolution.
"""
