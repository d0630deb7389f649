"""The decoder-only MoE Transformer: blocks, the model, and the causal-LM head with its loss.

Data flows: ids -> embed_tokens -> for each block: input_layernorm -> self_attn -> residual ->
post_attention_layernorm -> mlp (dense FFN for the first ``first_k_dense_replace`` layers, the MoE
layer after) -> residual -> norm -> lm_head (and, with candidate_head, a second head beside it). Module
names follow Hugging Face (Mixtral, Qwen2-MoE, DeepSeek-V3) so state dicts convert by renaming little.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mymoe.config import ModelConfig
from mymoe.model.attention import Attention, KVCache, build_attention_mask
from mymoe.model.heads import dual_head_choice
from mymoe.model.layers import RMSNorm, RotaryEmbedding, build_ffn, build_norm, dropout
from mymoe.model.mla import MultiHeadLatentAttention
from mymoe.model.mtp import MultiTokenPrediction
from mymoe.model.moe.layer import MoELayer

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # [B, S, V]
    loss: Optional[torch.Tensor] = None  # lm_loss + aux_loss: what to backpropagate
    lm_loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None  # sum over MoE layers, already coefficient-weighted
    router_stats: list = field(default_factory=list)  # one stats dict per MoE layer, in layer order
    past_key_values: Optional[list] = None  # one KVCache per layer
    hidden: Optional[torch.Tensor] = None  # [B, S, d] final hidden states (after the last norm)
    mtp_loss: Optional[torch.Tensor] = None  # multi-token prediction loss, unweighted (in loss weighted)
    candidate_logits: Optional[torch.Tensor] = None  # [B, S, V] of the candidate head (candidate_head)
    candidate_loss: Optional[torch.Tensor] = None  # its loss, already weighted by candidate_loss_weight


def layer_is_sliding(config: ModelConfig, layer_index: int) -> bool:
    if config.sliding_window is None:
        return False
    if config.layer_types is None:
        return True
    return layer_index < len(config.layer_types) and config.layer_types[layer_index] == "sliding_attention"


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.input_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        if config.attention_type == "mla":
            self.self_attn = MultiHeadLatentAttention(config)
        else:
            self.self_attn = Attention(
                config.hidden_size,
                config.num_attention_heads,
                config.num_key_value_heads,
                config.head_dim,
                qkv_bias=config.attention_bias or config.qkv_bias,
                out_bias=config.attention_bias,
                qk_norm=config.qk_norm,
                clip_qkv=config.clip_qkv,
                eps=config.rms_norm_eps,
                scale=config.attention_multiplier,
                sinks=config.attention_sinks,
                sliding_window=config.sliding_window if layer_is_sliding(config, layer_index) else None,
                dropout=config.attention_dropout,
                causal=config.is_causal,
            )
        self.post_attention_layernorm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.is_moe = layer_index >= config.first_k_dense_replace
        self.residual_multiplier = config.residual_multiplier
        self.hidden_dropout = config.hidden_dropout
        if self.is_moe:
            self.mlp = MoELayer(
                config.hidden_size, config.moe, init_std=config.initializer_range, expert_dropout=config.expert_dropout
            )
        else:
            gelu = config.hidden_act == "gelu"
            self.mlp = build_ffn(gelu, config.hidden_size, config.intermediate_size, config.expert_dropout)

    def forward(self, hidden, cos, sin, mask=None, cache=None):
        """hidden [B, S, d] -> (hidden [B, S, d], MoEAux or None for a dense block)."""
        scale = self.residual_multiplier
        attention = self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache)
        attention = dropout(attention, self.hidden_dropout, self.training)
        hidden = hidden + (attention * scale if scale != 1 else attention)
        if not self.is_moe:
            output, aux = self.mlp(self.post_attention_layernorm(hidden)), None
        else:
            output, aux = self.mlp(self.post_attention_layernorm(hidden))
        output = dropout(output, self.hidden_dropout, self.training)
        return hidden + (output * scale if scale != 1 else output), aux


class MoETransformer(nn.Module):
    """Embedding, blocks and final norm: token ids in, final hidden states out."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = build_norm(config.norm_type, config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding.from_config(config)
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None):
        """input_ids [B, S] -> (hidden [B, S, d], list of MoEAux, one per MoE layer)."""
        batch, seq = input_ids.shape
        past_length = past_key_values[0].length if past_key_values is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                # count real tokens only, so a left-padded row gets the positions it would have unpadded
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past_length:]
            else:
                position_ids = torch.arange(past_length, past_length + seq, device=input_ids.device)
                position_ids = position_ids.expand(batch, seq)
        hidden = self.embed_tokens(input_ids)  # [B, S, d]
        if self.config.embedding_multiplier != 1:
            hidden = hidden * self.config.embedding_multiplier
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)  # [B, S, head_dim]
        mask = build_attention_mask(attention_mask, past_length, seq, input_ids.device, self.config.is_causal)
        # recomputation would write the cache twice, and there is no backward pass to save memory for
        # without grad
        recompute = self.gradient_checkpointing and past_key_values is None and torch.is_grad_enabled()
        moe_aux = []
        for i, layer in enumerate(self.layers):
            cache = past_key_values[i] if past_key_values is not None else None
            if recompute:
                # non-reentrant checkpointing returns the MoE aux like any other output, so the aux
                # loss keeps its graph; the RNG state is replayed, so router noise recomputes identically
                hidden, aux = checkpoint(layer, hidden, cos, sin, mask, use_reentrant=False)
            else:
                hidden, aux = layer(hidden, cos, sin, mask, cache)
            if aux is not None:
                moe_aux.append(aux)
        return self.norm(hidden), moe_aux


class MoECausalLM(nn.Module):
    """The MoE Transformer with a language-model head.

    ``labels`` follow Hugging Face: aligned with input_ids (``labels=input_ids`` trains next-token
    prediction) and shifted inside, position t scored on ``labels[t + 1]``, as transformers'
    ForCausalLMLoss. ``shift_labels`` (transformers' name) are already shifted, ``shift_labels[t]`` the
    token after ``input_ids[t]``: what the data reader yields, so the trainer passes those. Positions
    whose label is -100 are ignored. With ``is_causal: false`` (an encoder) nothing is shifted, as in
    Hugging Face's masked-LM models: labels[t] is the original token where input t was masked and -100
    elsewhere. ``candidate_head`` adds a second linear head over the same final hidden state, trained on
    the same targets (see mymoe.model.heads).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = MoETransformer(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = None
        if config.num_nextn_predict_layers:
            self.mtp = MultiTokenPrediction(config, Block(config, config.num_hidden_layers))
        if config.tie_word_embeddings:
            # one matrix reads tokens in and writes them out: fewer parameters, and in small models it
            # often trains better
            self.lm_head.weight = self.model.embed_tokens.weight
        self.candidate_head = None
        if config.candidate_head:  # never tied: it would then be the main head
            self.candidate_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------------------
    # initialisation

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights, unit norms; o_proj, down_proj and the experts' w_down get std / sqrt(2 L).

        The residual stream is a sum of 2 L block outputs (attention and FFN in each of L layers); with
        the output projections scaled by 1 / sqrt(2 L) its variance at init stays that of one block's
        output however deep the model is (GPT-2, Megatron's scaled_init_method).

        Each parameter draws from its own generator, seeded by one number taken from torch's global RNG
        and by the parameter's name: torch.manual_seed fixes the whole model, and no parameter's values
        depend on which modules were built before it.
        """
        config = self.config
        std = config.initializer_range
        residual_std = std / math.sqrt(2 * config.num_hidden_layers)
        base_seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        done = set()  # a tied matrix is initialised once, under its first name (the embedding)
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if id(param) in done:
                    continue
                done.add(id(param))
                name = f"{module_name}.{param_name}" if module_name else param_name
                generator = torch.Generator(device=param.device)
                generator.manual_seed(base_seed ^ zlib.crc32(name.encode()))
                if isinstance(module, (RMSNorm, nn.LayerNorm)) and param_name == "weight":
                    param.fill_(1.0)
                elif param_name == "bias" or param_name.endswith("_bias") or param_name == "sinks":
                    param.zero_()
                elif name.endswith(("o_proj.weight", "down_proj.weight", "down_proj", "experts.w_down")):
                    param.normal_(0.0, residual_std, generator=generator)
                else:
                    param.normal_(0.0, std, generator=generator)

    # ------------------------------------------------------------------------------------------------
    # forward and loss

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        past_key_values: Optional[list] = None,
        use_cache: bool = False,
        step: Optional[int] = None,
        shift_labels: Optional[torch.Tensor] = None,
    ) -> CausalLMOutput:
        """input_ids, labels or shift_labels [B, S]; attention_mask [B, past + S] with 1 = token, 0 = padding
        (left padding allowed); past_key_values: the list of KVCache returned by an earlier call with
        use_cache=True; step: the trainer's global step, kept for the MoE schedules (None keeps the last one
        given)."""
        if step is not None:
            self.set_step(step)
        if labels is not None:
            if shift_labels is not None:
                raise ValueError("give labels (aligned with input_ids) or shift_labels (already shifted), not both")
            shift_labels = shift_hf_labels(labels) if self.config.is_causal else labels
        if use_cache and past_key_values is None:
            past_key_values = [KVCache() for _ in range(self.config.num_hidden_layers)]
        hidden, moe_aux = self.model(input_ids, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(hidden)  # [B, S, V]
        if self.config.logits_scaling != 1:
            logits = logits / self.config.logits_scaling
        mtp_loss = None
        if shift_labels is not None and self.mtp is not None and input_ids.shape[1] > 1:
            # position t pairs hidden[t] with token t+1 and is scored on token t+2 (shift_labels[t + 1])
            mask = attention_mask[:, :-1] if attention_mask is not None else None
            mtp_hidden, mtp_aux = self._mtp_hidden(hidden[:, :-1], input_ids[:, 1:], 0, None, mask)
            mtp_loss = causal_lm_loss(self.lm_head(mtp_hidden), shift_labels[:, 1:])
            moe_aux = moe_aux + ([mtp_aux] if mtp_aux is not None else [])
        aux_loss = sum((aux.aux_loss for aux in moe_aux), hidden.new_zeros((), dtype=torch.float32))
        output = CausalLMOutput(
            logits=logits,
            aux_loss=aux_loss,
            router_stats=[aux.stats for aux in moe_aux],
            past_key_values=past_key_values,
            hidden=hidden,
            mtp_loss=mtp_loss,
        )
        if self.candidate_head is not None:
            output.candidate_logits = self.candidate_head(hidden)
            if shift_labels is not None:
                candidate_loss = causal_lm_loss(output.candidate_logits, shift_labels)
                output.candidate_loss = self.config.candidate_loss_weight * candidate_loss
        if shift_labels is not None:
            output.lm_loss = causal_lm_loss(logits, shift_labels)
            output.loss = training_loss(output, self.config.mtp_loss_weight)
        return output

    def _mtp_hidden(self, hidden, next_ids, start: int, cache: Optional[KVCache], attention_mask=None):
        """The MTP head over positions start.. : hidden [B, S, d] at t and the ids of tokens t+1 [B, S]."""
        batch, seq = next_ids.shape
        position_ids = torch.arange(start, start + seq, device=next_ids.device).expand(batch, seq)
        cos, sin = self.model.rotary_emb(position_ids, hidden.dtype)
        past_length = cache.length if cache is not None else 0
        mask = build_attention_mask(attention_mask, past_length, seq, next_ids.device)
        return self.mtp(hidden, self.model.embed_tokens(next_ids), cos, sin, mask, cache)

    @torch.no_grad()
    def mtp_draft(self, hidden, next_ids, start: int, cache: KVCache) -> torch.Tensor:
        """Run the MTP head over positions start.. (extending its cache); its greedy guess [B, 1] for the
        token after the last of next_ids."""
        mtp_hidden, _ = self._mtp_hidden(hidden, next_ids, start, cache)
        return self.lm_head(mtp_hidden[:, -1:]).argmax(-1)

    def iter_moe_layers(self) -> Iterator[MoELayer]:
        """The MoE layers in depth order (to swap dispatchers, or update expert biases after a step)."""
        blocks = list(self.model.layers) + ([self.mtp.block] if self.mtp is not None else [])
        for block in blocks:
            if block.is_moe:
                yield block.mlp

    def set_step(self, step: int) -> None:
        """Hand the global step to every MoE layer, as a Python int: the schedules of
        mymoe/model/moe/dynamics.py read it on the host, so no step waits on the device for it."""
        for layer in self.iter_moe_layers():
            layer.step = step

    def reset_routers(self, seed: int) -> list[nn.Parameter]:
        """Re-initialise every MoE layer's router as at construction, each from a generator seeded by `seed`
        and its name (every rank draws the same weights); returns the parameters whose optimizer state
        must be cleared."""
        reset = []
        for name, module in self.named_modules():
            if isinstance(module, MoELayer):
                generator = torch.Generator(device=module.gate.weight.device)
                generator.manual_seed(seed ^ zlib.crc32(name.encode()))
                reset += module.reset_router(self.config.initializer_range, generator)
        return reset

    # ------------------------------------------------------------------------------------------------
    # size and cost

    def num_parameters(self, active_only: bool = False) -> int:
        """All parameters (a tied matrix once), or only those one token touches: every dense weight,
        the router and shared experts, and top-k of the routed experts. Counts the full model even
        when this process holds only its share of the experts."""
        total = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
        moe = self.config.moe
        experts_counted = moe.num_experts_per_tok if active_only else moe.n_routed_experts
        for layer in self.iter_moe_layers():
            experts = layer.experts
            per_expert = experts.num_parameters_per_expert()
            total += per_expert * (experts_counted - experts.num_experts)
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token, for an MFU estimate.

        6 per active weight that multiplies (the input embedding is a lookup, not a matmul, unless it is
        tied to the head) plus the attention scores and mix: 6 * layers * heads * (score + value dims) * seq_len
        (PaLM, appendix B), counting the full square though causal kernels skip about half of it.
        """
        config = self.config
        matmul_params = self.num_parameters(active_only=True)
        if not config.tie_word_embeddings:
            matmul_params -= self.model.embed_tokens.weight.numel()
        if config.attention_type == "mla":
            score_and_mix_dims = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
        else:
            score_and_mix_dims = 2 * config.head_dim
        attention = 6 * config.num_hidden_layers * config.num_attention_heads * score_and_mix_dims * seq_len
        return 6.0 * matmul_params + attention

    # ------------------------------------------------------------------------------------------------
    # generation

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **options) -> torch.Tensor:
        """Continue each prompt of input_ids [B, S] by up to max_new_tokens; returns [B, S + new].

        The tokens of ``stream``, collected; ``options`` are stream's keywords (temperature, top_k, top_p,
        repetition_penalty, generator, attention_mask, use_cache, eos_token_id, vocab_limit, strategy,
        confidence_threshold), with its defaults.
        """
        steps = self.stream(input_ids, max_new_tokens, **options)
        return torch.cat([input_ids] + [next_token[:, None] for next_token in steps], dim=1)

    @torch.no_grad()
    def stream(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        repetition_penalty: float = 1.0,
        generator: Optional[torch.Generator] = None,
        attention_mask: Optional[torch.Tensor] = None,
        use_cache: bool = True,
        eos_token_id: Optional[int] = None,
        vocab_limit: Optional[int] = None,
        strategy: str = "sample",
        confidence_threshold: float = 0.5,
    ) -> Iterator[torch.Tensor]:
        """Yield each step's next token of every row [B] as it is sampled: the one decode loop, behind
        ``generate`` and the ``mymoe.generate`` command line.

        temperature 0 is greedy. Prompts of different lengths are left-padded with attention_mask 0.
        A row that has produced eos_token_id keeps emitting it until every row has, then generation stops.
        Ids from vocab_limit up (a vocabulary padded past the tokenizer's pieces) are never sampled.
        The model runs in eval mode meanwhile (no router noise, eval capacity) and returns to its mode.
        strategy "dual_head" (a model with candidate_head) is greedy over both heads: the main head's token
        where its probability after the repetition penalty is >= confidence_threshold, else the
        candidate head's (mymoe.model.heads.dual_head_choice); temperature, top_k and top_p are unused.
        """
        self.check_can_generate(strategy)
        was_training = self.training
        self.eval()
        try:
            batch, prompt_length = input_ids.shape
            if attention_mask is not None and bool(attention_mask.all()):
                attention_mask = None  # no padding: let attention use its causal fast path
            cache = None
            if use_cache:
                cache = [
                    KVCache(max_length=prompt_length + max_new_tokens) for _ in range(self.config.num_hidden_layers)
                ]
            finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            tokens, step_input = input_ids, input_ids
            for _ in range(max_new_tokens):
                output = self(step_input, attention_mask=attention_mask, past_key_values=cache)
                logits = output.logits[:, -1].float()
                if vocab_limit is not None:
                    logits[:, vocab_limit:] = float("-inf")
                if strategy == "dual_head":
                    candidate = output.candidate_logits[:, -1].float()
                    if vocab_limit is not None:
                        candidate[:, vocab_limit:] = float("-inf")
                    main = penalize_repetition(logits, tokens, attention_mask, repetition_penalty)
                    candidate = penalize_repetition(candidate, tokens, attention_mask, repetition_penalty)
                    next_token = dual_head_choice(main, candidate, confidence_threshold)  # [B]
                else:
                    next_token = sample_next_token(
                        logits, tokens, attention_mask, temperature, top_k, top_p, repetition_penalty, generator
                    )  # [B]
                if eos_token_id is not None:
                    next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                    finished |= next_token == eos_token_id
                tokens = torch.cat((tokens, next_token[:, None]), dim=1)
                if attention_mask is not None:
                    attention_mask = torch.cat((attention_mask, attention_mask.new_ones(batch, 1)), dim=1)
                step_input = next_token[:, None] if use_cache else tokens
                yield next_token
                if eos_token_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)

    def check_can_generate(self, strategy: str = "sample") -> None:
        """Refuse what this model cannot generate with this strategy (stream does so before its first forward)."""
        if not self.config.is_causal:
            raise ValueError(
                "model.is_causal=false: a bidirectional (encoder) model sees the tokens after each position, so "
                "it cannot generate left to right; generate from a causal model"
            )
        if strategy not in ("sample", "dual_head"):
            raise ValueError(f"strategy={strategy!r} is unknown: use 'sample' or 'dual_head'")
        if strategy == "dual_head" and self.candidate_head is None:
            raise ValueError(
                "strategy='dual_head' needs a model trained with a candidate head (model.candidate_head=true)"
            )


def training_loss(output: CausalLMOutput, mtp_loss_weight: float, aux_loss_scale: float = 1.0) -> torch.Tensor:
    """What to backpropagate: the lm loss + the (ramped) aux loss + the weighted multi-token prediction loss
    + the (already weighted) candidate head's loss.
    The one recipe: the model's own `loss` is it at aux_loss_scale 1, the trainer's step uses its ramp."""
    loss = output.lm_loss + aux_loss_scale * output.aux_loss
    if output.mtp_loss is not None:
        loss = loss + mtp_loss_weight * output.mtp_loss
    if output.candidate_loss is not None:
        loss = loss + output.candidate_loss
    return loss


def shift_hf_labels(labels: torch.Tensor) -> torch.Tensor:
    """Hugging Face labels [B, S], aligned with the inputs -> the target of each position [B, S]: the next
    label, and -100 after the last (transformers' ForCausalLMLoss pads the same way)."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_loss(logits: torch.Tensor, shift_labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, S, V] against the already shifted targets [B, S] over positions
    whose target is not -100 (0 when there are none), in fp32."""
    losses = F.cross_entropy(
        logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return losses / (shift_labels != IGNORE_INDEX).sum().clamp(min=1)


def sample_next_token(logits, tokens, attention_mask, temperature, top_k, top_p, repetition_penalty, generator):
    """One token per row from logits [B, V] of the last position, as Hugging Face's logits processors do.

    repetition_penalty divides positive and multiplies negative logits of tokens already in the row
    (padding, where attention_mask is 0, excluded); top_k keeps the k largest; top_p keeps the smallest set whose probability
    reaches top_p (always at least one token).
    """
    logits = penalize_repetition(logits, tokens, attention_mask, repetition_penalty)
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[:, -1] = False
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def penalize_repetition(logits, tokens, attention_mask, repetition_penalty: float) -> torch.Tensor:
    """logits [B, V] with those of tokens already in each row (padding excluded) divided by the penalty when
    positive and multiplied by it when negative (Hugging Face's RepetitionPenaltyLogitsProcessor)."""
    if repetition_penalty == 1.0:
        return logits
    real = torch.ones_like(tokens, dtype=logits.dtype) if attention_mask is None else attention_mask.to(logits.dtype)
    seen = torch.zeros_like(logits).scatter_add_(1, tokens, real) > 0  # [B, V]
    penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
    return torch.where(seen, penalised, logits)
