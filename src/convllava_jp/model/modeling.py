"""The ConvLLaVA-JP model: ConvNeXt (+ stage 5) -> MLP projector -> any HF causal LM.

Reads like transformers' `modeling_llava.py`: image features are spliced into the LLM's input
embeddings with one `masked_scatter` at the image-placeholder positions. The three parts are
ordinary HF modules, so save/load, `generate`, gradient checkpointing, peft and accelerate work
as they do for any HF model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, ConvNextModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..errors import ConfigError, TemplateError
from .configuration import PROJECTOR_TYPES_HELP, ConvLlavaConfig
from .small_map_conv import use_small_map_convs

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


def build_projector(projector_type: str, vision_hidden_size: int, text_hidden_size: int) -> nn.Sequential:
    """LLaVA's projectors: `linear`, or `mlpNx_gelu` = N Linear layers with GELU between them.

    `mlp2x_gelu` is Linear(C, d) -> GELU -> Linear(d, d); keys `0.*` and `2.*` as in LLaVA.
    """
    if projector_type == "linear":
        return nn.Sequential(nn.Linear(vision_hidden_size, text_hidden_size))
    match = _MLP_RE.match(projector_type)
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"unknown projector type {projector_type!r}; choose from {PROJECTOR_TYPES_HELP}")
    layers: list[nn.Module] = [nn.Linear(vision_hidden_size, text_hidden_size)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(), nn.Linear(text_hidden_size, text_hidden_size)]
    return nn.Sequential(*layers)


CPU_TOWER_PIXELS = 2**19  # per tower call when encoding without gradients on a CPU (encode_images)


class ConvLlavaPreTrainedModel(PreTrainedModel):
    config: ConvLlavaConfig
    config_class = ConvLlavaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # `post_init` adds the children's own lists: the vision tower's and whatever the LLM declares.
    _no_split_modules = []


class ConvLlavaForConditionalGeneration(ConvLlavaPreTrainedModel, GenerationMixin):
    """ConvLLaVA: `vision_tower` (ConvNextModel) + `projector` + `language_model` (a causal LM)."""

    def __init__(self, config: ConvLlavaConfig):
        super().__init__(config)
        self.vision_tower = ConvNextModel(config.vision_config)
        # ConvLLaVA uses the last stage's feature map; the pooled-output norm would be an unused
        # parameter (DDP complains about those), so it is not built.
        self.vision_tower.layernorm = nn.Identity()
        use_small_map_convs(self.vision_tower)  # 7x7 depthwise convs on maps < 4x4: the centre only
        self._set_stage5_drop_path(config)
        self.projector = build_projector(
            config.projector_type, config.vision_hidden_size, config.text_config.hidden_size
        )
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        # transformers' activation checkpointing sets these on every module that has the flag;
        # `encode_images` checkpoints each ConvNeXt stage with them (ConvNextModel has none of its own).
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        self.post_init()
        self._suppress_image_token()

    def _set_stage5_drop_path(self, config: ConvLlavaConfig) -> None:
        rates = config.stage5_drop_path_rates
        stages = self.vision_tower.encoder.stages
        if not rates or len(stages) <= config.trunk_stages:
            return
        from transformers.models.convnext.modeling_convnext import ConvNextDropPath

        for stage in stages[config.trunk_stages :]:
            n = len(stage.layers)
            step = (rates[-1] - rates[0]) / (n - 1) if n > 1 else 0.0
            values = [rates[-1]] if n == 1 else [rates[0] + step * j for j in range(n)]
            for layer, p in zip(stage.layers, values):
                layer.drop_path = ConvNextDropPath(p) if p > 0 else nn.Identity()

    # --- HF plumbing -------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self):
        return self.language_model.get_decoder()

    # --- generation --------------------------------------------------------------------------
    def _suppress_image_token(self, previous: int | None = None) -> None:
        """Put the placeholder id in `generation_config.suppress_tokens` (replacing `previous`).

        A generated placeholder would demand an image that does not exist, so `generate` never
        emits it (transformers' `SuppressTokensLogitsProcessor`). The loss is unaffected.
        """
        generation_config = getattr(self, "generation_config", None)
        if generation_config is None:
            return
        tokens = [t for t in generation_config.suppress_tokens or [] if t != previous]
        if self.config.image_token_id not in tokens:
            tokens.append(self.config.image_token_id)
        generation_config.suppress_tokens = tokens

    def set_image_token_id(self, image_token_id: int) -> None:
        """Change the placeholder id in the config and in the generation config together."""
        previous, self.config.image_token_id = self.config.image_token_id, image_token_id
        self._suppress_image_token(previous)

    def adjust_generation_fn(self, *args, **kwargs):
        # `from_pretrained` reads generation_config.json here (dirs written before the placeholder
        # was suppressed this way lack it): suppress it again after loading.
        result = super().adjust_generation_fn(*args, **kwargs)
        self._suppress_image_token()
        return result

    # --- vision ------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> stage-5 feature map flattened row-major: (B, H/s * W/s, C).

        Without gradients on a CPU the batch runs in chunks of at most `CPU_TOWER_PIXELS` pixels
        (3 images at 384 px, 32 at 128, 1 at 768): per image the ConvNeXt tower is no faster in a
        bigger batch there, often slower (its activations leave the caches), and its peak memory
        grows with the batch (docs/benchmarks.md).
        """
        n, _, h, w = pixel_values.shape
        chunk = max(1, CPU_TOWER_PIXELS // (h * w))
        if n > chunk and pixel_values.device.type == "cpu" and not torch.is_grad_enabled():
            return torch.cat([self._encode_batch(part) for part in pixel_values.split(chunk)])
        return self._encode_batch(pixel_values)

    def _encode_batch(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vt = self.vision_tower
        hidden = vt.embeddings(pixel_values.to(dtype=vt.embeddings.patch_embeddings.weight.dtype))
        for stage in vt.encoder.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden = self._gradient_checkpointing_func(stage.__call__, hidden)
            else:
                hidden = stage(hidden)
        return hidden.flatten(2).transpose(1, 2)

    def get_image_features(self, pixel_values: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """Projected image tokens of all images, concatenated in order: (sum_i N_i, d).

        `pixel_values` is a batch (B, 3, H, W) or a list of (3, H_i, W_i) images of any sizes;
        images of the same size are encoded together.
        """
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim == 4:
            feats = self.encode_images(pixel_values)
            return self.projector(feats).flatten(0, 1)
        images = list(pixel_values)
        if not images:
            return torch.zeros(0, self.config.text_config.hidden_size, device=self.device, dtype=self.dtype)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            if img.ndim != 3:
                raise ConfigError(f"image {i}: expected a (3, H, W) tensor, got shape {tuple(img.shape)}")
            groups.setdefault(tuple(img.shape[-2:]), []).append(i)
        per_image: list[torch.Tensor | None] = [None] * len(images)
        for idx in groups.values():
            feats = self.projector(self.encode_images(torch.stack([images[i] for i in idx])))
            for j, i in enumerate(idx):
                per_image[i] = feats[j]
        return torch.cat(per_image, dim=0)  # type: ignore[arg-type]

    def project_vision_features(self, vision_features: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """`encode_images` output given ahead (B, N, C), or a list of (N_i, C) -> (sum_i N_i, d)."""
        if isinstance(vision_features, torch.Tensor):
            return self.projector(vision_features).flatten(0, 1)
        feats = list(vision_features)
        if not feats:
            return torch.zeros(0, self.config.text_config.hidden_size, device=self.device, dtype=self.dtype)
        if all(f.shape == feats[0].shape for f in feats):
            return self.projector(torch.stack(feats)).flatten(0, 1)
        return torch.cat([self.projector(f) for f in feats], dim=0)

    def splice_image_features(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None,
        vision_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Input embeddings (B, T, d) with the image placeholders replaced by image tokens.

        One `masked_scatter`: the k-th placeholder (row-major over the batch) gets the k-th image
        token, so images must be listed in the order their `<image>` tags appear. Instead of
        `pixel_values`, `vision_features` may give what the tower made of the images beforehand
        (a frozen tower's cached output): only the projector runs on them.
        """
        if vision_features is not None:
            if pixel_values is not None:
                raise ValueError("pass pixel_values or vision_features, not both")
            pixel_values = vision_features
        image_mask = input_ids == self.config.image_token_id
        embed = self.get_input_embeddings()
        # Placeholder ids may lie outside the vocabulary: never look them up.
        inputs_embeds = embed(input_ids.masked_fill(image_mask, 0))
        n_placeholders = int(image_mask.sum())
        if pixel_values is None or (not isinstance(pixel_values, torch.Tensor) and len(pixel_values) == 0):
            if n_placeholders:
                raise TemplateError(f"input has {n_placeholders} image placeholder tokens but no images")
            return inputs_embeds
        if vision_features is not None:
            image_features = self.project_vision_features(vision_features)
        else:
            image_features = self.get_image_features(pixel_values)
        if image_features.shape[0] != n_placeholders:
            raise TemplateError(
                f"image placeholders and image features do not match: {n_placeholders} placeholder tokens, "
                f"{image_features.shape[0]} image tokens from the images given"
            )
        return inputs_embeds.masked_scatter(
            image_mask.unsqueeze(-1), image_features.to(inputs_embeds.device, inputs_embeds.dtype)
        )

    # --- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | Sequence[torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        loss_only: bool = False,
        vision_features: torch.Tensor | Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """input_ids (B, T) with placeholders; pixel_values (B, 3, H, W) or a list of (3, H, W).

        labels (B, T) with -100 where not supervised; the shift happens inside the LLM's loss.
        `loss_only` (with labels; what the trainer asks for): the LM head runs on the supervised
        positions only and no logits are returned (`supervised_loss`). `vision_features`: the
        tower's output for the images, computed beforehand, in place of `pixel_values`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.splice_image_features(input_ids, pixel_values, vision_features)
        if "past_key_values" in kwargs and cache is None:
            cache = kwargs.pop("past_key_values")
        if loss_only and labels is not None and cache is None and self._loss_parts() is not None:
            kwargs.pop("use_cache", None)
            return self.supervised_loss(inputs_embeds, labels, attention_mask, position_ids, **kwargs)
        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            labels=labels,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )
        return outputs

    def _loss_parts(self) -> tuple[nn.Module, nn.Module] | None:
        """(decoder, lm_head) of the LLM when its logits are plain `lm_head(decoder(x))` (no
        softcapping or logit scale, which the LLM's own forward applies), else None. A peft
        wrapper is looked through (its LoRA layers live inside the same modules)."""
        cfg = self.config.text_config
        if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (
            None,
            1,
            1.0,
        ):
            return None
        lm = self.language_model
        lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
        head, decoder = getattr(lm, "lm_head", None), getattr(lm, "base_model", None)
        if not isinstance(head, nn.Module) or not isinstance(decoder, nn.Module) or decoder is lm:
            return None
        return decoder, head

    def supervised_loss(
        self,
        inputs_embeds: torch.Tensor,
        labels: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """The LLM's causal-LM loss with the LM head applied only where a next token is supervised.

        Same value as the LLM's own loss (mean over supervised tokens, or sum / `num_items_in_batch`
        as the Trainer passes it), but the vocabulary projection and its backward skip the image
        and prompt positions: in a LLaVA batch most positions carry -100.
        """
        decoder, head = self._loss_parts()
        hidden = decoder(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        targets = labels[:, 1:].to(hidden.device)
        keep = targets != -100
        logits = head(hidden[:, :-1][keep]).float()
        loss = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
        denominator = num_items_in_batch if num_items_in_batch is not None else keep.sum()
        if torch.is_tensor(denominator):
            denominator = denominator.to(loss.device)
        return CausalLMOutputWithPast(loss=loss / denominator)


def parameter_counts(
    model: ConvLlavaForConditionalGeneration, trainable_only: bool = False
) -> dict[str, int]:
    """Parameters per part: vision_trunk (stages 1..trunk_stages), stage5 (added stages), projector,
    llm, and their total; `trainable_only` counts only parameters with `requires_grad`."""

    def numel(params) -> int:
        return sum(p.numel() for p in params if p.requires_grad or not trainable_only)

    trunk_stages = model.config.trunk_stages
    counts = {"vision_trunk": 0, "stage5": 0, "projector": 0, "llm": 0}
    for name, p in model.vision_tower.named_parameters():
        added = name.startswith("encoder.stages.") and int(name.split(".")[2]) >= trunk_stages
        counts["stage5" if added else "vision_trunk"] += numel([p])
    counts["projector"] = numel(model.projector.parameters())
    counts["llm"] = numel(model.language_model.parameters())
    counts["total"] = sum(counts.values())
    return counts
