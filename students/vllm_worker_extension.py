"""Loaded inside a vLLM server's worker processes (`--worker-extension-cls`), never by distill
itself: the method the rollout engine calls through `/collective_rpc` to take new weights.

It runs in the vLLM environment, so it imports nothing of distill; students/rollout_engine.py
puts a copy of this file on the server's PYTHONPATH.

`load_trainer_weights` is vLLM's own in-place reload (`Worker.reload_weights`) plus one repair:
vLLM 0.32 on CPU packs each MoE layer's expert weights into its grouped-GEMM layout once, at
start-up. A later weight update copies checkpoint-layout experts into that packed storage
without packing them (`UnquantizedFusedMoEMethod._setup_kernel` skips the experts' set-up when a
kernel exists), so a MoE model served on CPU computes with scrambled experts after any reload
(seen: log-probabilities 0.04 nats off after reloading the very same weights, 0.4 after new
ones). Packing again what was just copied restores the layout. GPU kernels are left alone.
"""

from __future__ import annotations


class WeightSync:
    def load_trainer_weights(self, weights_path: str) -> int:
        """Reload every weight from the safetensors files in `weights_path`; returns the number
        of MoE layers whose experts were packed again."""
        self.reload_weights(weights_path=weights_path)
        from vllm.platforms import current_platform

        if not current_platform.is_cpu():
            return 0
        repacked = 0
        for module in self.model_runner.get_model().modules():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if experts is not None and hasattr(experts, "process_weights_after_loading"):
                experts.process_weights_after_loading(module)
                repacked += 1
        return repacked
