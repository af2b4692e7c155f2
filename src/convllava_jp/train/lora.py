"""LoRA / QLoRA adapters on the LLM of a stage (peft), merged back when the stage saves.

The VLM stays our model: only `model.language_model` is wrapped in a `peft.PeftModel`, so the
projector (and anything else the recipe's `trainable` list names) trains in full beside the
adapters, checkpoints hold the whole VLM, and `merge_lora` turns the wrapped LLM back into a plain
`transformers` causal LM so the stage's output directory loads with `from_pretrained`.

QLoRA (`bits: 4`) keeps the LLM's base weights in 4-bit NF4 (bitsandbytes, CUDA only) and merges
the adapters into a full-precision copy of the base at the end, not into the 4-bit weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError
from .recipe import LoraSpec

log = logging.getLogger(__name__)

# Attention and MLP projections of each LLM family: LoRA on all of them is what QLoRA (Dettmers et
# al.) found to match full fine-tuning; peft's own defaults adapt only the attention's q/v.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # llm-jp-1.3b-v1.0; c_proj is both attn and MLP output
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen3": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def default_target_modules(model_type: str) -> list[str]:
    """LoRA target module names for an LLM `model_type` (a HF config's `model_type`)."""
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(
            f"no default LoRA target modules for LLM type {model_type!r} (known: "
            f"{', '.join(DEFAULT_TARGET_MODULES)}); set lora.target_modules to the names of its linear layers"
        )
    return list(DEFAULT_TARGET_MODULES[model_type])


def check_lora_supported(spec: LoraSpec) -> None:
    """Raise ConfigError when this machine cannot run `spec` (QLoRA needs CUDA and bitsandbytes)."""
    if spec.bits == 4:
        if not torch.cuda.is_available():
            raise ConfigError(
                "lora.bits=4 (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit weights run only there. "
                "Use lora.bits=null (LoRA on full-precision weights) on this machine"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "lora.bits=4 (QLoRA) needs bitsandbytes: pip install 'convllava-jp[gpu]' "
                "(or bitsandbytes), or set lora.bits=null"
            )


def _lora_config(spec: LoraSpec, model_type: str):
    from peft import LoraConfig

    targets = spec.target_modules or default_target_modules(model_type)
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
        # GPT-2's Conv1D layers store weights transposed (in, out)
        fan_in_fan_out=model_type == "gpt2",
    )


def quantize_llm_4bit(model, work_dir: str | os.PathLike) -> None:
    """Replace `model.language_model` by a 4-bit NF4 copy of itself (QLoRA base; CUDA only).

    bitsandbytes quantizes while loading, so the LLM is written to a scratch directory under
    `work_dir` and read back with a `BitsAndBytesConfig`; the vision tower and projector are not
    touched. Each process of a distributed run puts its copy on its own GPU.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    Path(work_dir).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".qlora-base-", dir=work_dir))
    try:
        model.language_model.save_pretrained(scratch)
        llm = AutoModelForCausalLM.from_pretrained(
            scratch, quantization_config=quant, dtype=compute_dtype, device_map={"": local_rank}
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=False)
    model.language_model = llm
    log.info("QLoRA: LLM loaded in 4-bit NF4 (compute dtype %s)", compute_dtype)


def apply_lora(model, spec: LoraSpec) -> int:
    """Wrap `model.language_model` with LoRA adapters; returns the number of adapter parameters.

    The LLM's own weights are frozen by peft; the adapters are the only trainable LLM parameters.
    Other modules keep whatever `requires_grad` they had (the recipe's `trainable` list).
    """
    from peft import get_peft_model

    model_type = model.config.text_config.model_type
    config = _lora_config(spec, model_type)
    model.language_model = get_peft_model(model.language_model, config)
    n = sum(p.numel() for p in model.language_model.parameters() if p.requires_grad)
    if not n:
        raise ConfigError(
            f"LoRA target modules {config.target_modules} matched no layer of the {model_type} LLM; "
            "set lora.target_modules"
        )
    log.info(
        "LoRA r=%d alpha=%s dropout=%s on %s: %s adapter parameters",
        spec.r,
        spec.alpha,
        spec.dropout,
        sorted(config.target_modules),
        f"{n:,}",
    )
    return n


def is_lora_wrapped(model) -> bool:
    """Whether `model.language_model` is a peft model."""
    from peft import PeftModel

    return isinstance(model.language_model, PeftModel)


def merge_lora(model, spec: LoraSpec, init_dir: str | os.PathLike | None = None):
    """Fold the adapters into the LLM's weights; returns a model with a plain HF LLM again.

    LoRA: `merge_and_unload` in place. QLoRA: the adapters go into a full-precision copy of the
    stage's starting LLM (from `init_dir`), so the saved model carries no 4-bit rounding and no
    quantization config; the other modules' trained weights are copied over.
    """
    if not is_lora_wrapped(model):
        return model
    if spec.bits is None:
        model.language_model = model.language_model.merge_and_unload()
        return model
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    from ..model.model_dir import load_model_dir

    if init_dir is None:
        raise ConfigError("merging QLoRA adapters needs the stage's starting model directory")
    adapters = {
        k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model.language_model).items()
    }
    full, _ = load_model_dir(init_dir, dtype=torch.float32)
    others = {
        k: v.detach().float().cpu()
        for k, v in model.state_dict().items()
        if not k.startswith("language_model.")
    }
    full.load_state_dict(others, strict=False)
    full.language_model = get_peft_model(
        full.language_model, _lora_config(spec, full.config.text_config.model_type)
    )
    set_peft_model_state_dict(full.language_model, adapters)
    full.language_model = full.language_model.merge_and_unload()
    return full
