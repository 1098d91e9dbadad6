"""Our DDPM U-Net (``model=cifar resample=ddpm``, ``DiffusionModelCIFAR``) as diffusers' ``UNet2DModel``: the config
that builds the same network and the exact map of its weights.

What corresponds (diffusers 0.42.1, ``models/unets/unet_2d.py`` and ``unet_2d_blocks.py``):
  time_mlp: sinusoidal(ch) = [sin, cos](t exp(-log(10000) i / (half - 1)))  Timesteps(ch, flip_sin_to_cos=False,
            downscale_freq_shift=1), then mlp.0 / mlp.2                      time_embedding.linear_1 / linear_2
            (time_dim any width: time_embedding_dim)
  ResBlock norm1 conv1 time_proj.1 norm2 conv2 skip                          ResnetBlock2D norm1 conv1 time_emb_proj
            (dropout after norm2's SiLU in both)                              norm2 conv2 conv_shortcut
  SelfAttention norm, qkv (1x1 conv, (3, heads, head_dim)), proj            Attention group_norm, to_q/k/v, to_out.0
  down_blocks[l].downsample (3x3, stride 2, padding 1)                       down_blocks[l].downsamplers.0.conv
  bottleneck res1 attn res2                                                  mid_block resnets.0 attentions.0 resnets.1
  up_blocks[j].upsample (nearest + 3x3 conv, at the block's start)           up_blocks[j-1].upsamplers.0.conv (at the end)
  out_norm / out_conv, init_conv                                             conv_norm_out / conv_out, conv_in
GroupNorm eps is torch's 1e-5 everywhere (norm_eps=1e-5); one head everywhere is attention_head_dim=None.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, Tuple

import torch
from torch import nn

from ..models.unet import DiffusionModelCIFAR, ResBlock, SelfAttention

Pairs = Iterator[Tuple[str, str]]  # (our module path, diffusers module path)


def _attention(block: nn.Module) -> bool:
    return isinstance(block.attentions[0], SelfAttention)


def head_dim(model: DiffusionModelCIFAR) -> Any:
    """attention_head_dim: None for one head everywhere, else channels / heads, which must be the same at every
    attention (diffusers has one head width; ours has one head count)."""
    attentions = [m for m in model.modules() if isinstance(m, SelfAttention)]
    heads = {m.num_heads for m in attentions}
    if heads == {1}:
        return None
    widths = {m.qkv.in_channels // m.num_heads for m in attentions}
    if len(widths) != 1:
        raise ValueError(f"model.num_heads={heads.pop()} gives head widths {sorted(widths)} at the attention levels; "
                         f"UNet2DModel has one head width (attention_head_dim): use num_heads=1")
    return widths.pop()


def unet2d_config(model: DiffusionModelCIFAR) -> Dict[str, Any]:
    """The UNet2DModel config of the same network as ``model``."""
    levels = range(len(model.hidden_dims))
    down = ["AttnDownBlock2D" if _attention(model.down_blocks[l]) else "DownBlock2D" for l in levels]
    up = ["AttnUpBlock2D" if _attention(block) else "UpBlock2D" for block in model.up_blocks]
    first = model.down_blocks[0].res_blocks[0]
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return dict(sample_size=model.image_size, in_channels=model.channels, out_channels=model.channels,
                time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
                time_embedding_dim=model.time_mlp.out_dim, down_block_types=down, up_block_types=up,
                block_out_channels=list(model.hidden_dims), layers_per_block=len(model.down_blocks[0].res_blocks),
                mid_block_type="UNetMidBlock2D", mid_block_scale_factor=1, downsample_padding=1,
                downsample_type="conv", upsample_type="conv", dropout=dropout, act_fn="silu",
                attention_head_dim=head_dim(model), norm_num_groups=first.norm1.num_groups,
                norm_eps=first.norm1.eps, resnet_time_scale_shift="default", add_attention=True,
                center_input_sample=False, class_embed_type=None, num_class_embeds=None)


def _res_block(ours: str, theirs: str, block: ResBlock) -> Pairs:
    yield from ((f"{ours}.{a}", f"{theirs}.{b}") for a, b in
                (("norm1", "norm1"), ("conv1", "conv1"), ("time_proj.1", "time_emb_proj"), ("norm2", "norm2"),
                 ("conv2", "conv2")))
    if isinstance(block.skip, nn.Conv2d):
        yield f"{ours}.skip", f"{theirs}.conv_shortcut"


def _level(ours: str, theirs: str, block: nn.Module) -> Pairs:
    """A level's ResBlocks and attentions, in order (an encoder or a decoder level)."""
    for i, (res, attn) in enumerate(zip(block.res_blocks, block.attentions)):
        yield from _res_block(f"{ours}.res_blocks.{i}", f"{theirs}.resnets.{i}", res)
        if isinstance(attn, SelfAttention):
            yield f"{ours}.attentions.{i}", f"{theirs}.attentions.{i}"


def module_pairs(model: DiffusionModelCIFAR) -> Pairs:
    """Every (our module, its diffusers module) pair; an attention pair is split by ``attention_weights``."""
    yield from (("time_mlp.mlp.0", "time_embedding.linear_1"), ("time_mlp.mlp.2", "time_embedding.linear_2"),
                ("init_conv", "conv_in"))
    for l, block in enumerate(model.down_blocks):
        yield from _level(f"down_blocks.{l}", f"down_blocks.{l}", block)
        if block.downsample is not None:
            yield f"down_blocks.{l}.downsample", f"down_blocks.{l}.downsamplers.0.conv"
    yield from _res_block("bottleneck.res1", "mid_block.resnets.0", model.bottleneck.res1)
    yield "bottleneck.attn", "mid_block.attentions.0"
    yield from _res_block("bottleneck.res2", "mid_block.resnets.1", model.bottleneck.res2)
    for j, block in enumerate(model.up_blocks):
        yield from _level(f"up_blocks.{j}", f"up_blocks.{j}", block)
        if block.upsample is not None:  # ours upsamples at a block's start, diffusers' at the previous one's end
            yield f"up_blocks.{j}.upsample.1", f"up_blocks.{j - 1}.upsamplers.0.conv"
    yield from (("out_norm", "conv_norm_out"), ("out_conv", "conv_out"))


def attention_weights(ours: str, theirs: str, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our 1x1-conv qkv (output channels (3, heads, head_dim)) and proj as diffusers' linear to_q/k/v and to_out.0."""
    q, k, v = state[f"{ours}.qkv.weight"][:, :, 0, 0].chunk(3)
    bq, bk, bv = state[f"{ours}.qkv.bias"].chunk(3)
    out = {f"{theirs}.group_norm.weight": state[f"{ours}.norm.weight"],
           f"{theirs}.group_norm.bias": state[f"{ours}.norm.bias"],
           f"{theirs}.to_out.0.weight": state[f"{ours}.proj.weight"][:, :, 0, 0],
           f"{theirs}.to_out.0.bias": state[f"{ours}.proj.bias"]}
    for name, weight, bias in (("to_q", q, bq), ("to_k", k, bk), ("to_v", v, bv)):
        out[f"{theirs}.{name}.weight"], out[f"{theirs}.{name}.bias"] = weight, bias
    return out


def to_unet2d_state(model: DiffusionModelCIFAR) -> Dict[str, torch.Tensor]:
    """``model``'s weights under UNet2DModel's names (contiguous copies, as safetensors stores them)."""
    state, out = model.state_dict(), {}
    for ours, theirs in module_pairs(model):
        if isinstance(model.get_submodule(ours), SelfAttention):
            out.update(attention_weights(ours, theirs, state))
        else:
            out.update({f"{theirs}.{p}": state[f"{ours}.{p}"] for p in ("weight", "bias")})
    return {key: value.detach().clone().contiguous() for key, value in out.items()}
