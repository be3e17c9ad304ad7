"""The PPO trainer (paper §3.3): one update per outer batch for the policy and value
adapters against the frozen reward adapter, built from ppo_equations and sampling.

Three named adapters share the one frozen base (`modeling.AdapterModel`): "reward" (loaded
frozen from the reward stage, LoRA r=16 + head), "policy" (LoRA r=32, α=16) and "value"
(LoRA r=32, α=16 + head), the last two fresh on the base chat model (the paper's start;
`PPOConfig.init_policy_from_mle` starts the policy from the MLE adapter instead).

One *outer batch* (7 prompts) gives one update. Outer batches alternate deterministically:
with `reference_fraction` = 0.5 the even ones are *sampled* (outputs drawn from the policy,
≤100 new tokens, temperature 1) and the odd ones are *reference* (the true outputs + EOS), as
in §3.3 ("for half of the outer loop batches ... the remaining half used ground-truth
outputs").

Per-token reward and alignment (modeling.py, "Alignment"). For output token a_t at position
p = P + t of prompt + output:
  * pi(a_t | s_t) and V(s_t) are read from the hidden state at p - 1;
  * r_{t+1} (Eq. 2) = reward-model head at p (input + output so far *including* a_t)
    + the length penalty of token t (`length_penalty`). A sequence-level reward adapter
    (`RewardConfig.level`, recorded with the adapter) gives its head's score at the last
    output token only, zero before it (`lastmile.reward.ppo_rewards`).
Lengths count tokens as the batch layout stores them: an output that ended carries its EOS
(true outputs: text + EOS; samples that stopped: ... EOS), a sample cut at the token budget has
none. So a sample equal to the reference text plus EOS pays nothing, and every token past the
reference's length (EOS included) pays `length_penalty` (-2.5).

Speed and memory (bench/README.md has the measurements). With one PPO epoch and one
minibatch (the paper's setting) the pre-update policy *is* the current one, so pi_old and the
V used in Eq. 2 come from the same forward that is differentiated (w_t = exp(logp -
logp.detach()) = 1 with the right gradient) instead of extra no-grad forwards; the general
path (`PPOConfig.ppo_epochs` > 1, `minibatches` > 1 or `kl_coef` > 0) does the textbook rollout
forwards. Log-probabilities use vocabulary logits only at output positions. Sampling is a
KV-cached loop and sampling and the reward model run on merged copies of the weights
(`merged_weights`). Forwards and backwards go in micro-batches of rows, so only one
micro-batch's activations live at a time; losses are normalised by the whole batch's token
count, so the gradient does not depend on the split. `PPOTrainer(precision="bfloat16")` runs
the frozen base's matmuls in bf16 (an option; float32 by default). Log-probabilities are of
the sampling distribution (logits / temperature, as TRL does): pi itself at temperature 1.

Optimiser: one AdamW (cosine from `optim.learning_rate`, as every stage; the value head from
`optim.head_learning_rate` when set) over the policy and value parameters; each model's
gradient norm is clipped separately to
`optim.max_grad_norm`, so the value loss's scale (returns reach hundreds with the length
penalty) cannot shrink the policy's step. Adam is invariant to a constant loss scale per
parameter, so the value loss needs no coefficient: the objective is L_policy + L_value.

Data parallelism (`lastmile.distributed`). As N processes, each rank samples, scores and
differentiates a contiguous share of every outer batch's rows. Everything normalised over the
batch (the token count of E_t, whitening, the logged means) sums numerators and denominators
over ranks, and the gradients are summed before clipping, so each rank takes the step one
process would; the main rank writes the log, checkpoints and adapters.
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from . import distributed
from . import fsdp as sharding
from .config import PPOConfig
from .modeling import AdapterModel, SequenceBatch, autocast, check_precision, collate
from .ppo_equations import (batch_masked_mean, discounted_returns, explained_variance, gae,
                            last_token, length_penalty, policy_loss, value_loss, whiten)
from .reward import check_level, ppo_rewards
from .sampling import can_merge, merged_weights, row_generators, sample_outputs
from .train_utils import make_optimizer, nonfinite, step_schedule

log = logging.getLogger(__name__)


POLICY = "policy"
VALUE = "value"
REWARD = "reward"
SAMPLED = "sampled"
REFERENCE = "reference"
#: Rows per forward/backward (activation memory is per micro-batch; the gradient is the same).
#: Two rows of ~350 tokens keep SmolLM2-135M's PPO step under 4 GiB at full matmul speed.
DEFAULT_MICRO_BATCH = 2
#: What must be finite for an optimiser step (besides the rewards): `PPOTrainer.step`.
WATCHED = ("advantage_mean", "policy_loss", "value_loss", "policy_grad_norm", "value_grad_norm")


def batch_kinds(n_batches: int, reference_fraction: float) -> list[str]:
    """Deterministic alternation: batch k is "reference" when floor((k+1)f) > floor(kf).

    f = 0.5 gives sampled, reference, sampled, ... (half and half, §3.3); f = 0 all sampled,
    f = 1 all reference.
    """
    if not 0.0 <= reference_fraction <= 1.0:
        raise ValueError(f"PPOConfig.reference_fraction must be in [0, 1], got "
                         f"{reference_fraction}")
    # The small epsilon makes 0.5 * 2 == 1 robust against float rounding of other fractions.
    return [REFERENCE if math.floor((k + 1) * reference_fraction + 1e-9)
            > math.floor(k * reference_fraction + 1e-9) else SAMPLED for k in range(n_batches)]


@dataclass
class Rollout:
    """One outer batch's trajectories and rewards; [B, T] tensors are in output-token space."""

    kind: str  # "sampled" | "reference"
    batch: SequenceBatch  # prompt + output, right-padded (modeling.collate)
    mask: torch.Tensor  # [B, T] bool, t < output length
    rm_rewards: torch.Tensor  # [B, T] reward-model prediction for a_t (read at its position)
    penalty: torch.Tensor  # [B, T] length penalty of a_t
    rewards: torch.Tensor  # [B, T] r_{t+1} of Eq. 2: rm_rewards + penalty (- KL term)
    reference_lengths: torch.Tensor  # [B] tokens, EOS included
    kl: torch.Tensor | None = None  # [B, T] log pi - log pi_base, when kl_coef > 0
    # Distributed: the B rows are this rank's share of the outer batch.
    positions: list[int] | None = None  # each row's place in the outer batch (None: 0..B-1)
    batch_rows: int | None = None  # rows of the whole outer batch (None: B)

    @property
    def output_lengths(self) -> torch.Tensor:
        return self.batch.output_lengths

    @property
    def places(self) -> list[int]:
        return list(range(self.mask.shape[0])) if self.positions is None else self.positions

    @property
    def n_rows(self) -> int:
        return self.mask.shape[0] if self.batch_rows is None else self.batch_rows


def to_output_space(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-output-token values [N] (row-major, as `hidden[mask]` yields them) -> [B, T]."""
    out = flat.new_zeros(mask.shape)
    out[mask] = flat  # differentiable: index_put keeps the graph to `flat`
    return out


def output_space_mask(lengths: torch.Tensor, T: int | None = None) -> torch.Tensor:
    T = int(lengths.max()) if T is None else T
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # [B, T]


def _rows(batch: SequenceBatch, idx: Sequence[int]) -> SequenceBatch:
    """Rows `idx` of a batch, trimmed to their own longest row (less padding per micro-batch)."""
    sel = torch.as_tensor(list(idx), device=batch.input_ids.device)
    width = int(batch.attention_mask[sel].sum(-1).max())
    return SequenceBatch(batch.input_ids[sel, :width], batch.attention_mask[sel, :width],
                         batch.output_mask[sel, :width], batch.prompt_lengths[sel],
                         batch.output_lengths[sel])


class PPOTrainer:
    """PPO updates for adapters "policy" and "value" against the frozen adapter "reward".

    The model must already hold the three adapters (see `build_model`). `step(rollout)` is
    one outer-batch update; `gradients(rollout)` stops before the optimiser (tests compare
    the fast and the textbook path with it). `fast=False` forces the textbook path.

    `micro_batch_size`: rows per forward/backward (None: the whole batch at once); the
    gradient is the same, the activation memory is one micro-batch's. `merge`: sample and
    score the reward with the LoRA merged into copies of the weights (`merged_weights`).
    `precision` "bfloat16" runs the frozen base's matmuls in bf16 (float32 accumulation):
    samples from bf16 copies of the merged weights, reward/value/policy forwards (and their
    backwards) under autocast with the float32 residual stream, log-softmax, losses,
    advantages, LoRA weights, gradients and AdamW state in float32. About 2x faster on CPUs
    with AVX512-BF16/AMX (bench/README.md); losses and gradients then differ from float32 by
    bf16 rounding. The paper's own base was a 4-bit GPTQ model. "float32" (default) is exact.
    """

    def __init__(self, model: AdapterModel, tokenizer, cfg: PPOConfig, total_updates: int,
                 *, micro_batch_size: int | None = DEFAULT_MICRO_BATCH, fast: bool = True,
                 merge: bool = True, precision: str = "float32", reward_level: str = "token"):
        check_config(cfg)
        # The reward adapter's training level (reward.adapter_level): per token, or once on
        # the last output token (the paper's Discussion).
        self.reward_level = check_level(reward_level)
        check_precision(precision)
        for name, head in ((POLICY, False), (VALUE, True), (REWARD, True)):
            if name not in model.specs:
                raise ValueError(f"PPOTrainer needs adapter {name!r}; the model has "
                                 f"{sorted(model.specs)}")
            if head and name not in model.heads:
                raise ValueError(f"adapter {name!r} needs a scalar head")
        if micro_batch_size is not None and micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1 or None, got {micro_batch_size}")
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.micro_batch_size = micro_batch_size
        # A quantized or sharded base has no whole dense weights to merge into (`can_merge`):
        # sample and score unmerged.
        self.merge = merge and can_merge(model)
        if merge and not self.merge:
            log.info("quantized or sharded base: PPO samples and scores the reward with "
                     "unmerged LoRA")
        # Sharded layers (lastmile.fsdp): FSDP sums their gradients, and every rank runs as
        # many forwards as the rank with the most (`_in_lockstep`).
        self.sharded = sharding.is_sharded_model(model)
        self.precision = precision
        self.fast = fast and cfg.ppo_epochs == 1 and cfg.minibatches == 1 and cfg.kl_coef == 0
        self.device = model.lm_head.weight.device
        self.policy_params = [p for p in model.adapter_parameters(POLICY) if p.requires_grad]
        self.value_params = [p for p in model.adapter_parameters(VALUE) if p.requires_grad]
        if not self.policy_params or not self.value_params:
            raise ValueError("the policy and value adapters must be trainable")
        self.optimizer, self.scheduler = make_optimizer(
            self.policy_params + self.value_params, cfg.optim,
            total_updates * cfg.ppo_epochs * cfg.minibatches,
            head_params=list(model.heads[VALUE].parameters()))
        self.sample_calls = 0  # outer-batch number of `sample` calls that name none

    # -- trajectories ------------------------------------------------------------------
    def sample(self, prompt_ids: Sequence[Sequence[int]], min_new_tokens: int = 0, *,
               update: int | None = None, positions: Sequence[int] | None = None
               ) -> list[list[int]]:
        """Outputs drawn from the current policy (temperature, top-k, top-p from the config).

        Row i draws from the stream of (seed, `update`, positions[i]) (`row_generators`), so
        the rows of outer batch `update` get the same tokens however they are split over
        calls or processes. `update` None: this trainer's count of such calls; `positions`
        None: 0..B-1.
        """
        if not prompt_ids and not self.sharded:  # a rank whose share of a short batch is empty
            return []  # (sharded, it still joins the decoding: `sample_outputs`)
        if update is None:
            self.sample_calls += 1
            update = self.sample_calls
        positions = range(len(prompt_ids)) if positions is None else positions
        generators = row_generators(self.cfg.seed, update, positions, self.device)
        cfg = self.cfg
        return sample_outputs(self.model, prompt_ids, POLICY, max_new_tokens=cfg.max_new_tokens,
                              eos_id=self.tokenizer.eos_token_id,
                              pad_id=self.tokenizer.pad_token_id, temperature=cfg.temperature,
                              top_k=cfg.top_k, top_p=cfg.top_p, min_new_tokens=min_new_tokens,
                              generator=generators, merge=self.merge,
                              dtype=check_precision(self.precision))

    @torch.no_grad()
    def rollout(self, kind: str, prompt_ids: Sequence[Sequence[int]],
                output_ids: Sequence[Sequence[int]],
                reference_ids: Sequence[Sequence[int]], *,
                positions: Sequence[int] | None = None,
                batch_rows: int | None = None) -> Rollout:
        """Score outputs: reward model at each output token + length penalty (- KL term).

        Distributed: the rows are this rank's share of the outer batch, at `positions` of its
        `batch_rows` rows (None: the rows are the whole batch).
        """
        if kind not in (SAMPLED, REFERENCE):
            raise ValueError(f"batch kind must be {SAMPLED!r} or {REFERENCE!r}, got {kind!r}")
        if any(len(o) == 0 for o in output_ids):
            raise ValueError("rollout: every output needs at least one token")
        where = {"positions": None if positions is None else list(positions),
                 "batch_rows": batch_rows}
        if not output_ids:
            empty = self._empty_rollout(kind, **where)
            if self.sharded:  # join the other ranks' sharded forwards
                for _ in self._in_lockstep(0, REWARD):
                    pass
                if self.cfg.kl_coef:
                    self._policy_logprobs(empty, POLICY), self._policy_logprobs(empty, None)
            return empty
        batch = collate(list(prompt_ids), list(output_ids), self.tokenizer.pad_token_id)
        batch = batch.to(self.device)
        mask = output_space_mask(batch.output_lengths)  # [B, T]
        rm = mask.new_zeros(mask.shape, dtype=torch.float32)
        merged = merged_weights(self.model, REWARD) if self.merge else contextlib.nullcontext()
        with merged, self._autocast():
            for idx in self._in_lockstep(len(output_ids), REWARD):
                part = _rows(batch, idx)
                hidden = self.model.hidden_states(part.input_ids, part.attention_mask,
                                                  None if self.merge else REWARD)
                scores = self.model.scalar(hidden[part.output_mask], REWARD).float()  # [N]
                rm[idx] = to_output_space(scores, mask[idx])
        rm = ppo_rewards(rm, mask, self.reward_level)  # [B, T]
        ref_lengths = torch.tensor([len(r) for r in reference_ids], device=self.device)
        penalty = length_penalty(batch.output_lengths, ref_lengths, mask.shape[1],
                                 self.cfg.length_penalty).to(self.device)
        rollout = Rollout(kind, batch, mask, rm, penalty, rm + penalty, ref_lengths, **where)
        if self.cfg.kl_coef:
            rollout.kl = self._policy_logprobs(rollout, POLICY) - self._policy_logprobs(
                rollout, None)
            rollout.rewards = rollout.rewards - self.cfg.kl_coef * rollout.kl
        return rollout

    def _empty_rollout(self, kind: str, positions, batch_rows) -> Rollout:
        """No rows (a rank whose share of a short outer batch is empty): [0, 1] tensors, so
        the rank joins every sum over ranks with nothing to add."""
        ids = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        lengths = torch.zeros(0, dtype=torch.long, device=self.device)
        batch = SequenceBatch(ids, ids, ids.bool(), lengths, lengths)
        zeros = torch.zeros(0, 1, device=self.device)
        return Rollout(kind, batch, ids.bool(), zeros, zeros, zeros, lengths,
                       kl=zeros if self.cfg.kl_coef else None, positions=positions,
                       batch_rows=batch_rows)

    # -- forward pieces ------------------------------------------------------------------
    def _micro_batches(self, n: int) -> list[list[int]]:
        size = self.micro_batch_size or max(n, 1)
        return [list(range(i, min(i + size, n))) for i in range(0, n, size)]

    def _in_lockstep(self, n: int, adapter: str | None,
                     backward: bool = False) -> Iterator[list[int]]:
        """The micro-batches of `n` rows (row indices). Sharded, every rank must run as many
        forwards (and backwards) as the rank with the most, since each runs the layers'
        gathers: the count is agreed before the first (`fsdp.shortfall`, a collective) and the
        missing ones run as idle forwards after the last. Consume it whole."""
        parts = self._micro_batches(n)
        missing = sharding.shortfall(len(parts)) if self.sharded else 0
        yield from parts
        self._idle(missing, adapter, backward)

    def _idle(self, times: int, adapter: str | None, backward: bool = False) -> None:
        """`times` forwards of one one-token row with `adapter` (each with the backward of
        zero times its states): they change nothing, but run the sharded layers' gathers
        (and reduce-scatters) as a real micro-batch does."""
        ids = torch.full((1, 1), self.tokenizer.pad_token_id, device=self.device)
        for _ in range(times):
            with torch.set_grad_enabled(backward), self._autocast():
                hidden = self.model.hidden_states(ids, torch.ones_like(ids), adapter)
            if backward:
                (hidden.float().sum() * 0.0).backward()

    def _autocast(self):  # bf16 attention: PPO's larger steps outgrow the rounding
        return autocast(self.model, self.precision, exact_lora=False)

    def _states(self, part: SequenceBatch, adapter: str | None) -> torch.Tensor:
        """[N, H]: the states s_t that predict each output token (hidden at p - 1)."""
        with self._autocast():
            hidden = self.model.hidden_states(part.input_ids, part.attention_mask, adapter)
        return hidden[:, :-1][part.action_mask()]

    def _logprobs(self, part: SequenceBatch, adapter: str | None) -> torch.Tensor:
        """[N] log pi(a_t | s_t), vocabulary logits only at output positions (log-softmax in
        float32 at any precision)."""
        targets = part.input_ids[:, 1:][part.action_mask()]
        states = self._states(part, adapter)
        with self._autocast():
            return self.model.token_logprobs(states, targets, self.cfg.temperature)

    @torch.no_grad()
    def _policy_logprobs(self, rollout: Rollout, adapter: str | None) -> torch.Tensor:
        out = torch.zeros_like(rollout.rewards)
        for idx in self._in_lockstep(rollout.mask.shape[0], adapter):
            out[idx] = to_output_space(self._logprobs(_rows(rollout.batch, idx), adapter).float(),
                                       rollout.mask[idx])
        return out

    @torch.no_grad()
    def _values(self, rollout: Rollout) -> torch.Tensor:
        out = torch.zeros_like(rollout.rewards)
        for idx in self._in_lockstep(rollout.mask.shape[0], VALUE):
            part = _rows(rollout.batch, idx)
            out[idx] = to_output_space(self.model.scalar(self._states(part, VALUE), VALUE).float(),
                                       rollout.mask[idx])
        return out

    def _advantages(self, rollout: Rollout, values: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        advantages, returns = gae(rollout.rewards, values, rollout.mask, self.cfg.gamma,
                                  self.cfg.lam)
        if self.cfg.whiten_advantages:
            advantages = whiten(advantages, rollout.mask)  # over the whole outer batch
        return advantages, returns

    @staticmethod
    def _tokens(rollout: Rollout, rows: Sequence[int]) -> int:
        """Output tokens of `rows` and of every other rank's rows: E_t's denominator."""
        return int(distributed.all_reduce_sum(float(rollout.mask[list(rows)].sum())))

    def _sync_gradients(self) -> None:
        """Sum the gradients over ranks: every rank then holds the whole batch's (sharded
        ones: its shard of it, which FSDP's reduce-scatter summed already)."""
        if self.sharded:
            sharding.reduce_replicated_gradients(self.policy_params + self.value_params)
        else:
            distributed.all_reduce_gradients(self.policy_params + self.value_params)

    def _value_backward(self, rollout: Rollout, rows: Sequence[int], returns: torch.Tensor,
                        total_tokens: int) -> tuple[float, torch.Tensor]:
        """Value loss over `rows` (forward + backward per micro-batch); (its share, values)."""
        loss_sum, values = 0.0, torch.zeros_like(rollout.rewards)
        for idx in self._in_lockstep(len(rows), VALUE, backward=True):
            idx = [rows[i] for i in idx]
            mask = rollout.mask[idx]  # [b, T]
            v = self.model.scalar(self._states(_rows(rollout.batch, idx), VALUE), VALUE)  # [N]
            share = int(mask.sum()) / total_tokens  # masked mean over the whole batch
            loss = value_loss(v.float(), returns[idx][mask], torch.ones_like(v, dtype=torch.bool))
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
            values[idx] = to_output_space(v.detach().float(), mask)
        return loss_sum, values

    def _policy_backward(self, rollout: Rollout, rows: Sequence[int], advantages: torch.Tensor,
                         old_logprobs: torch.Tensor | None, total_tokens: int) -> dict:
        """Policy loss over `rows`; old_logprobs None: the fast path (pi_old = pi_theta)."""
        sums = {"policy_loss": 0.0, "clip_fraction": 0.0, "approx_kl": 0.0}
        for idx in self._in_lockstep(len(rows), POLICY, backward=True):
            idx = [rows[i] for i in idx]
            mask = rollout.mask[idx]
            logp = self._logprobs(_rows(rollout.batch, idx), POLICY).float()  # [N]
            old = logp.detach() if old_logprobs is None else old_logprobs[idx][mask]
            ones = torch.ones_like(logp, dtype=torch.bool)
            loss, clip_fraction, approx_kl = policy_loss(logp, old, advantages[idx][mask], ones,
                                                         self.cfg.clip_eps)
            share = int(mask.sum()) / total_tokens
            (loss * share).backward()
            for key, value in zip(sums, (loss, clip_fraction, approx_kl)):
                sums[key] += float(value.detach()) * share
        return sums

    # -- updates ---------------------------------------------------------------------------
    def gradients(self, rollout: Rollout) -> dict:
        """Zero the gradients, then backpropagate one full-batch PPO loss (no optimiser step).

        Fast path: values and log-probs from the differentiated forwards. Textbook path: no-grad
        forwards for V and pi_old first, then the differentiated ones.
        """
        self.optimizer.zero_grad(set_to_none=True)
        rows = list(range(rollout.mask.shape[0]))
        total = self._tokens(rollout, rows)
        if self.fast:
            # Eq. 4 targets need no values, so the value pass comes first and its detached
            # outputs are the V(s_t) of Eq. 2 (the parameters have not moved yet).
            returns = discounted_returns(rollout.rewards, rollout.mask, self.cfg.gamma)
            v_loss, values = self._value_backward(rollout, rows, returns, total)
            advantages, _ = self._advantages(rollout, values)
            stats = self._policy_backward(rollout, rows, advantages, None, total)
        else:
            values = self._values(rollout)
            old_logprobs = self._policy_logprobs(rollout, POLICY)
            advantages, returns = self._advantages(rollout, values)
            v_loss, _ = self._value_backward(rollout, rows, returns, total)
            stats = self._policy_backward(rollout, rows, advantages, old_logprobs, total)
        stats = distributed.sum_stats(dict(stats, value_loss=v_loss))  # each rank's share
        self._sync_gradients()
        stats.update(self._value_stats(rollout, values, advantages, returns))
        return stats

    def _value_stats(self, rollout: Rollout, values, advantages, returns) -> dict:
        """Means over the whole outer batch: V(s_t) and A_t per token, the return per row;
        the share of the returns' variance V predicts (None when the returns are constant)."""
        first = rollout.mask[:, 0]  # [B]: rows with an output (all)
        # The action that ends each row (EOS, or the budget's last token): its value and
        # advantage show whether Eq. 2 rewards stopping (docs/demo-experiments.md).
        sums = distributed.sum_stats({
            "rows": float(first.sum()), "returns": float(returns[:, 0][first].sum()),
            "final_values": float(last_token(values, rollout.mask).sum()),
            "final_advantages": float(last_token(advantages, rollout.mask).sum())})
        rows = sums["rows"] or 1.0
        explained = float(explained_variance(values, returns, rollout.mask))
        return {"value_mean": float(batch_masked_mean(values, rollout.mask)),
                "value_explained_variance": explained if math.isfinite(explained) else None,
                "advantage_mean": float(batch_masked_mean(advantages, rollout.mask)),
                "return_mean": sums["returns"] / rows,
                "final_value_mean": sums["final_values"] / rows,
                "final_advantage_mean": sums["final_advantages"] / rows}

    def clip_gradients(self) -> dict:
        """Clip each group's gradient norm; the norms before clipping."""
        max_norm = self.cfg.optim.max_grad_norm
        norms = {}
        for name, params in (("policy", self.policy_params), ("value", self.value_params)):
            grads = [p for p in params if p.grad is not None]
            if self.sharded:  # the global norm over every rank's shards (a collective)
                norms[f"{name}_grad_norm"] = sharding.clip_gradients(grads, max_norm)
                continue
            norm = (torch.nn.utils.clip_grad_norm_(grads, max_norm) if max_norm is not None
                    else torch.linalg.vector_norm(torch.stack(
                        [torch.linalg.vector_norm(p.grad) for p in grads])))
            norms[f"{name}_grad_norm"] = float(norm)
        return norms

    def apply(self) -> dict:
        """Clip each group's gradient norm, take the optimiser and scheduler step."""
        norms = self.clip_gradients()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        return {"lr": lr, **norms}

    def _apply_if_finite(self, rollout: Rollout, stats: dict) -> dict:
        """`apply`, except that a non-finite reward, advantage, loss or gradient norm skips the
        optimiser step (gradients zeroed; the scheduler still steps, following the data).

        Adds "lr", the norms and "nonfinite" ({name: value}, {} when the step was taken).
        """
        stats.update(self.clip_gradients())
        # Any bad r_t of any rank shows in the sum over ranks, which every rank reads.
        reward = distributed.all_reduce_sum(float(rollout.rewards[rollout.mask].sum()))
        watched = {"reward": reward}
        watched.update({k: stats[k] for k in WATCHED if k in stats})
        stats["nonfinite"] = nonfinite(watched)
        stats["lr"] = self.scheduler.get_last_lr()[0]
        if stats["nonfinite"]:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        step_schedule(self.scheduler)
        return stats

    def step(self, rollout: Rollout) -> dict:
        """One outer-batch update: one optimiser step (paper), or epochs × minibatches.

        Steps whose reward, advantages, losses or gradient norms are not finite are skipped;
        stats["nonfinite"] names them ({} when every step was taken).
        """
        if self.fast:
            return self._apply_if_finite(rollout, self.gradients(rollout))
        values = self._values(rollout)
        old_logprobs = self._policy_logprobs(rollout, POLICY)
        advantages, returns = self._advantages(rollout, values)
        n = rollout.n_rows  # minibatches are drawn from the whole outer batch's rows
        local = {place: i for i, place in enumerate(rollout.places)}  # batch row -> our row
        advantage_mean = float(batch_masked_mean(advantages, rollout.mask))
        runs: list[dict] = []
        bad: dict[str, float] = {}
        for epoch in range(self.cfg.ppo_epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(
                self.cfg.seed * 7919 + epoch)).tolist()
            size = math.ceil(n / self.cfg.minibatches)
            for start in range(0, n, size):
                rows = [local[r] for r in order[start: start + size] if r in local]
                total = self._tokens(rollout, rows)
                self.optimizer.zero_grad(set_to_none=True)
                v_loss, _ = self._value_backward(rollout, rows, returns, total)
                stats = self._policy_backward(rollout, rows, advantages, old_logprobs, total)
                stats = distributed.sum_stats(dict(stats, value_loss=v_loss))
                self._sync_gradients()
                stats["advantage_mean"] = advantage_mean
                bad.update(self._apply_if_finite(rollout, stats).pop("nonfinite"))
                runs.append(stats)
        merged_stats = {k: statistics.fmean(r[k] for r in runs) for k in runs[0]}
        merged_stats["lr"] = runs[0]["lr"]
        merged_stats.update(self._value_stats(rollout, values, advantages, returns))
        if rollout.kl is not None:  # per row, mean over the outer batch's rows
            kl_rows = float((rollout.kl * rollout.mask).sum())
            merged_stats["kl_base"] = distributed.all_reduce_sum(kl_rows) / n
        merged_stats["nonfinite"] = bad
        return merged_stats


def check_config(cfg: PPOConfig) -> None:
    checks = (("batch_size", cfg.batch_size >= 1), ("max_new_tokens", cfg.max_new_tokens >= 1),
              ("temperature", cfg.temperature > 0), ("ppo_epochs", cfg.ppo_epochs >= 1),
              ("minibatches", 1 <= cfg.minibatches <= cfg.batch_size),
              ("gamma", 0 < cfg.gamma <= 1), ("lam", 0 <= cfg.lam <= 1),
              ("clip_eps", cfg.clip_eps > 0), ("top_k", cfg.top_k >= 0),
              ("top_p", 0 < cfg.top_p <= 1), ("kl_coef", cfg.kl_coef >= 0),
              ("epochs", cfg.epochs >= 1),
              ("max_updates", cfg.max_updates is None or cfg.max_updates >= 1),
              ("optim.learning_rate", cfg.optim.learning_rate > 0))
    for name, ok in checks:
        if not ok:
            raise ValueError(f"PPOConfig.{name} is out of range: {_get(cfg, name)!r}")
    batch_kinds(1, cfg.reference_fraction)


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj
