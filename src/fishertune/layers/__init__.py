"""fishertune.layers: which blocks of a model matter, and compression plans that drop the rest.

- :func:`find_blocks`: a model's repeated blocks (ModuleList / Sequential stacks, parallel lists, a
  model's own ``blocks()``), or named ones; :func:`remove_blocks`, :func:`blocks_removed`;
- :func:`analyse` with the analysers of :data:`ANALYSERS` (Fisher per block and of a residual gate,
  gradient norm, Taylor, ablation, greedy ablation, block influence, angular distance, baselines);
  :func:`register_analyser` adds one;
- :class:`CompressionPlan`: blocks to drop for a count or target ratio, applied by rebuilding, saved as
  JSON + safetensors, :func:`load_compressed` without pickles; :func:`measure` and
  :func:`measure_latency`.

Model-agnostic: the core never imports fishertune.recsys; model adapters (``tasks``) import the zoo
and optional packages lazily.
"""

from fishertune.layers.analysers import ANALYSERS, Context, Importance, analyse, available, register_analyser
from fishertune.layers.blocks import (Block, block_parameters, blocks_removed, count_parameters, find_blocks,
                                      model_bytes, remove_blocks)
from fishertune.layers.latency import measure_latency, speedup
from fishertune.layers.plan import CompressionPlan, load_compressed, measure
from fishertune.layers.task import LayerTask

__all__ = [
    "ANALYSERS", "Block", "CompressionPlan", "Context", "Importance", "LayerTask", "analyse", "available",
    "block_parameters", "blocks_removed", "count_parameters", "find_blocks", "load_compressed", "measure",
    "measure_latency", "model_bytes", "register_analyser", "remove_blocks", "speedup",
]
