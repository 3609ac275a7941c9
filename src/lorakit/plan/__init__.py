"""`lorakit plan`: what a training run will cost and where to start, before renting a GPU.

    train config (+ --model) --params-->  the model on the meta device, adapter injected:
                                          trainable parameters per module type, adapter file size
                             --estimate--> peak memory for LoRA, QLoRA and full fine-tuning,
                                          with and without checkpointing, of the forwards of
                                          training.objective; what fits a budget
                             --suggest-->  rank, alpha, dropout, targets, epochs, with reasons;
                                          warnings for risky choices
                             --render-->   a table, or JSON

Precision follows `lorakit train`: on CUDA (the default to plan for) `model.dtype: auto` is bf16
and `training.bf16: auto` is on; on CPU both are fp32. The memory figures are tensor bytes, what
`torch.cuda.max_memory_allocated` (or `lorakit.train.memory.PeakMemory` on CPU) measures.
"""

from ..lazy import lazy_exports

_EXPORTS = {"Fit": ".result", "Plan": ".result", "TASK_RANKS": ".tasks", "make_plan": ".make", "parse_size": ".make",
            "render_json": ".render", "render_text": ".render"}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
