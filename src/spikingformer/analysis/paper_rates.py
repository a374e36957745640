"""The authors' logged firing rates and energy totals for Spikingformer-8-512 and 8-768 on ImageNet.

Source: the authors' repository zhouchenlin2096/Spikingformer (HEAD 4378623),
``imagenet/energy_consumption_logs/...Spikingformer-8-512_log.txt`` and ``...8-768_log.txt``,
as transcribed from the authors' training logs. The logs were written by
``imagenet/energy_consumption_on_imagenet.py`` over the whole ImageNet validation set (AMP).

Rates are percentages as printed (3 decimals). Which tensor each rate belongs to:

* tokenizer: the input of convs 1-4 (after the max-pool), i.e. our ``tokenizer.stages.{1..4}.conv``
  (the convs after the encoding conv, in model order);
* per block: ``proj_lif`` output = input of the q/k/v convs; ``q/k/v_lif`` outputs = operands of
  the attention product; ``attn_lif`` output = input of ``proj``; ``mlp1_lif`` = input of ``fc1``;
  ``mlp2_lif`` = input of ``fc2``.

The image conv (``FLOP_Conv^1``) and the head read real values and are MACs (rate 100%).
"""

from __future__ import annotations

from dataclasses import dataclass

from spikingformer.analysis.audit import ATTENTION_OPERANDS, AttentionOperands, SpikeRecord
from spikingformer.analysis.geometry import record_shapes
from spikingformer.models import model_config

# Column order of the per-block rows.
BLOCK_COLUMNS = ("proj_lif", "q_lif", "k_lif", "v_lif", "attn_lif", "mlp1_lif", "mlp2_lif")
# The column that is the input of each of a block's synaptic layers, in model order: q, k, v, proj, fc1, fc2.
LAYER_INPUT_COLUMNS = ("proj_lif", "proj_lif", "proj_lif", "attn_lif", "mlp1_lif", "mlp2_lif")


@dataclass(frozen=True)
class PaperEnergyLog:
    """One energy log: per-layer rates (%) and the printed totals."""

    model_name: str  # our zoo name
    tokenizer_rates: tuple[float, ...]  # % input rates of tokenizer convs 1..4
    block_rates: tuple[tuple[float, ...], ...]  # per block, BLOCK_COLUMNS order, %
    tokenizer_sops: tuple[float, ...]  # logged SOPs per image of tokenizer convs 1..4
    block_sops: tuple[tuple[float, float, float, float], ...]  # per block: q(=k=v) conv, proj, mlp1, mlp2
    mac_g: float  # printed totals, giga-operations per image
    ac_g: float
    conv_ac_g: float
    ssa_ac_g: float
    energy_mj: float
    ssa_heads: int  # Nheads in the log's hard-coded ssa_info (12 for 8-768 although the model has 8)
    ssa_ac_g_model_heads: float  # SSA term with the model's real head count
    ac_g_model_heads: float
    energy_mj_model_heads: float


SPIKINGFORMER_8_512 = PaperEnergyLog(
    model_name="spikingformer_8_512",
    tokenizer_rates=(25.831, 15.336, 13.107, 12.956),
    block_rates=(
        (17.660, 17.230, 3.626, 6.958, 29.780, 26.768, 3.289),
        (33.795, 11.627, 4.030, 7.173, 30.958, 33.019, 2.965),
        (34.222, 10.669, 4.441, 7.525, 31.419, 34.730, 2.560),
        (34.426, 8.189, 5.000, 7.688, 29.089, 34.661, 1.929),
        (34.327, 6.365, 4.325, 7.054, 20.989, 36.039, 1.421),
        (35.929, 7.711, 3.113, 7.322, 16.569, 35.950, 0.953),
        (34.229, 7.024, 2.420, 7.349, 10.683, 32.270, 0.569),
        (31.767, 9.728, 2.812, 7.955, 9.477, 29.923, 1.377),
    ),
    tokenizer_sops=(955_595_335, 567_352_733, 484_860_113, 239_640_650),
    block_sops=(
        (3.62941e7, 6.13243e7, 2.20483e8, 2.70491e7),
        (6.94564e7, 6.37504e7, 2.71977e8, 2.43829e7),
        (7.03340e7, 6.46987e7, 2.86070e8, 2.10542e7),
        (7.07534e7, 5.99013e7, 2.85500e8, 1.58669e7),
        (7.05497e7, 4.32201e7, 2.96846e8, 1.16867e7),
        (7.38410e7, 3.41199e7, 2.96115e8, 7.83468e6),
        (7.03473e7, 2.19995e7, 2.65801e8, 4.67946e6),
        (6.52882e7, 1.95155e7, 2.46475e8, 1.13244e7),
    ),
    mac_g=0.347329512,
    ac_g=6.51754094076244,
    conv_ac_g=6.489715413,
    ssa_ac_g=0.027825528,
    energy_mj=7.463502601886196,
    ssa_heads=8,
    ssa_ac_g_model_heads=0.027825528,
    ac_g_model_heads=6.51754094076244,
    energy_mj_model_heads=7.463502601886196,
)

SPIKINGFORMER_8_768 = PaperEnergyLog(
    model_name="spikingformer_8_768",
    tokenizer_rates=(19.797, 13.190, 12.085, 13.008),
    block_rates=(
        (14.749, 13.505, 2.981, 5.937, 26.517, 22.752, 2.350),
        (29.875, 10.502, 3.767, 6.063, 28.011, 29.201, 1.826),
        (29.063, 8.326, 3.776, 6.863, 28.583, 29.764, 1.556),
        (30.840, 5.633, 3.519, 6.847, 23.447, 31.473, 1.019),
        (31.186, 6.755, 3.175, 5.899, 18.023, 31.287, 0.563),
        (30.693, 5.022, 2.240, 4.205, 12.603, 29.968, 0.315),
        (29.206, 7.546, 3.070, 4.039, 8.090, 26.951, 0.289),
        (27.381, 8.323, 2.933, 7.041, 7.155, 26.967, 0.558),
    ),
    tokenizer_sops=(1.64781e9, 1.09785e9, 1.00588e9, 5.41388e8),
    block_sops=(
        (6.82013e7, 1.22779e8, 4.21380e8, 4.34742e7),
        (1.38150e8, 1.29700e8, 5.40832e8, 3.37890e7),
        (1.34396e8, 1.32344e8, 5.51249e8, 2.87947e7),
        (1.42610e8, 1.08566e8, 5.82919e8, 1.88605e7),
        (1.44212e8, 8.34505e7, 5.79468e8, 1.04172e7),
        (1.41930e8, 5.83567e7, 5.55030e8, 5.82482e6),
        (1.35056e8, 3.74602e7, 4.99165e8, 5.34302e6),
        (1.26617e8, 3.31282e7, 4.99451e8, 1.03331e7),
    ),
    mac_g=0.520993768,
    ac_g=12.513659576717108,
    conv_ac_g=12.478564154,
    ssa_ac_g=0.035095423,
    energy_mj=13.658864951845398,
    ssa_heads=12,
    ssa_ac_g_model_heads=0.052643135,
    ac_g_model_heads=12.531207,
    energy_mj_model_heads=13.674658,
)

PAPER_LOGS: dict[str, PaperEnergyLog] = {log.model_name: log for log in (SPIKINGFORMER_8_512, SPIKINGFORMER_8_768)}


def _log_layers(log: PaperEnergyLog, shapes: SpikeRecord) -> tuple[list[str], list[tuple[AttentionOperands, list[str]]]]:
    """The model's layers the log's columns belong to, in model order: the tokenizer convs after the
    encoding conv, and per block its attention operands and its six synaptic layers (q, k, v, proj,
    fc1, fc2)."""
    synaptic = shapes.synaptic_layers()
    stem_group = shapes.layers[shapes.encoding_layer].group
    tokenizer = [s.name for s in synaptic if s.group == stem_group][1:]
    blocks = [(ops, [s.name for s in synaptic if s.group == ops.group]) for ops in shapes.attention.values()]
    if (len(tokenizer), len(blocks)) != (len(log.tokenizer_rates), len(log.block_rates)) or any(
            len(layers) != len(LAYER_INPUT_COLUMNS) for _, layers in blocks):
        raise ValueError(f"the layers of {log.model_name} do not match the columns of its energy log")
    return tokenizer, blocks


def paper_rates(log: PaperEnergyLog) -> dict[str, float]:
    """The log's firing rates as fractions, keyed by the layer names of the model ``log.model_name``
    (recorded by :func:`~spikingformer.analysis.geometry.record_shapes`): the input rates of its
    synaptic layers and the rates of its attention operands (``blocks.{i}.attn.{q,k,v}_lif``).
    Suitable for :func:`spikingformer.analysis.energy.energy_from_rates`.
    """
    tokenizer, blocks = _log_layers(log, record_shapes(model_config(log.model_name)))
    rates = {name: r / 100 for name, r in zip(tokenizer, log.tokenizer_rates)}
    for (ops, layers), row in zip(blocks, log.block_rates):
        r = dict(zip(BLOCK_COLUMNS, (x / 100 for x in row)))
        rates.update({layer: r[column] for layer, column in zip(layers, LAYER_INPUT_COLUMNS)})
        rates.update({getattr(ops, op): r[f"{op}_lif"] for op in ATTENTION_OPERANDS})
    return rates


def paper_sops(log: PaperEnergyLog) -> dict[str, float]:
    """The log's per-layer SOPs per image, keyed by the model's layer names (for per-layer checks)."""
    tokenizer, blocks = _log_layers(log, record_shapes(model_config(log.model_name)))
    sops = dict(zip(tokenizer, log.tokenizer_sops))
    for (_, layers), (qkv, proj, fc1, fc2) in zip(blocks, log.block_sops):
        sops.update(zip(layers, (qkv, qkv, qkv, proj, fc1, fc2)))
    return sops
