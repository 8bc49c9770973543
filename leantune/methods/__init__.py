"""Finetuning methods applied by module swap, from a registry; PEFT-format adapter I/O; merging.

    from leantune.methods import apply, save_adapter, load_adapter
    apply(model, "lora", r=8, alpha=16, targets=["q_proj", "v_proj"])
    ... train ...
    save_adapter(model, "out")            # loads in peft.PeftModel.from_pretrained and vLLM
    load_adapter(model2, "out", adapter_name="support")
"""
from .adapter_io import (
    adapter_state_dict, load_adapter, lora_config_from_peft, peft_config_dict, read_adapter, save, save_adapter,
)
from .base import (
    AdapterLayer, active_adapters, adapter_configs, adapter_layers, adapter_slots, delete_adapter,
    disable_adapters, freeze_base, get_base_state_dict, list_adapters, set_adapter, set_adapter_trainable,
    trainable_parameters, unload,
)
from .corda import CordaConfig, apply_corda, collect_covariance, run_on
from .lora import LoraConfig, LoraLinear, RsLoraConfig, apply_lora, lora_scaling
from .merge import merge, merge_and_unload, unmerge
from .qlora import QLoraConfig, apply_qlora, base_quantization, read_sidecar, write_sidecar
from .registry import (
    CalibrationContext, MethodOption, MethodSpec, apply, get_method, list_methods, method_options, register_method,
)
from .adalora import AdaLoraConfig, AdaLoraLinear, RankAllocator, apply_adalora, orthogonal_regularizer
from .bottleneck import (
    BottleneckConfig, BottleneckLayer, apply_bottleneck, load_bottleneck, read_bottleneck, save_bottleneck,
)
from .combine import add_weighted_adapter, load_adapter_states, merge_task_adapters, snapshot_adapters
from .dora import DoraMagnitude
from .lora import DoraConfig
from .allora import AlloraConfig, allora_coefficient, apply_allora
from .full import FullConfig, apply_full
from .lt_sft import LtSftConfig, apply_lt_sft
from .sparse_diff import SparseDiff, apply_diff, read_sparse_diff, revert_diff, save_sparse_diff
from .qst import QSTConfig, QSTForCausalLM, apply_qst, load_qst, save_qst

__all__ = [
    "AdapterLayer", "LoraConfig", "LoraLinear", "MethodSpec", "QLoraConfig", "apply_qlora", "base_quantization",
    "read_sidecar", "write_sidecar", "RsLoraConfig", "active_adapters",
    "adapter_configs", "adapter_layers", "adapter_slots", "adapter_state_dict", "apply", "apply_lora",
    "delete_adapter", "disable_adapters", "freeze_base", "get_base_state_dict", "get_method",
    "list_adapters", "list_methods", "load_adapter", "lora_config_from_peft", "lora_scaling", "merge",
    "merge_and_unload", "peft_config_dict", "read_adapter", "register_method", "save_adapter",
    "set_adapter", "set_adapter_trainable", "trainable_parameters", "unload", "unmerge",
]
__all__ += [
    "BottleneckConfig", "BottleneckLayer", "add_weighted_adapter", "apply_bottleneck", "load_adapter_states",
    "load_bottleneck", "merge_task_adapters", "read_bottleneck", "save_bottleneck", "snapshot_adapters",
]
__all__ += ["AdaLoraConfig", "AdaLoraLinear", "RankAllocator", "apply_adalora", "orthogonal_regularizer"]
__all__ += ["AlloraConfig", "DoraConfig", "DoraMagnitude", "allora_coefficient", "apply_allora"]
__all__ += ["CordaConfig", "apply_corda", "collect_covariance", "run_on"]
__all__ += ["CalibrationContext", "MethodOption", "method_options", "save"]
__all__ += ["FullConfig", "apply_full"]
from .sara import SaraConfig, apply_sara

__all__ += ["SaraConfig", "apply_sara"]
__all__ += ["LtSftConfig", "SparseDiff", "apply_diff", "apply_lt_sft", "read_sparse_diff", "revert_diff",
            "save_sparse_diff"]
__all__ += ["QSTConfig", "QSTForCausalLM", "apply_qst", "load_qst", "save_qst"]
